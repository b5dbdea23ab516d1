//! Writing ONNX graphs (opset 17, IR version 8) of convlab's models for inference.
//!
//! [`Graph`] has one method per layer kind convlab's families are built from (convolution,
//! batch norm, ReLU, max/average pooling with their padding and ceil modes, LRN, concat,
//! residual add, global and adaptive average pooling, the linear classifier); each family's
//! `onnx` method (beside its `forward`, so the two are read and changed together) calls them in
//! forward order. Dropout is the identity at inference and emits nothing; auxiliary heads are
//! training-only and are not exported.
//!
//! The same trace, with [`Graph::shapes_only`], is convlab's shape tracer: every value's
//! per-sample shape is inferred as the nodes are added, so a model's convolution geometries
//! ([`Graph::convs`], which the kernel plan's table test reads) and its FLOPs
//! ([`Graph::flops`]) come from one pass over the built model, without touching its weights.
//!
//! Semantics follow the ONNX operator specs: `Conv`/`MaxPool`/`AveragePool` pads are
//! `[top, left, bottom, right]` (Burn's `Explicit` order), `LRN` divides by
//! `(bias + alpha / size * sum)^beta` (Burn's average over the window is that sum / size),
//! `BatchNormalization` uses the running statistics, `Gemm` computes `X W + b` with Burn's
//! `[in, out]` weight as it is.

pub mod proto;

use burn::nn::conv::Conv2d;
use burn::nn::pool::{AvgPool2d, MaxPool2d};
use burn::nn::{BatchNorm, Linear, LocalResponseNormConfig, PaddingConfig2d};
use std::collections::HashMap;

use burn::module::Param;
use burn::prelude::*;
use prost::Message;

use proto::*;

/// The opset the graphs are written for.
pub const OPSET: i64 = 17;
/// ONNX IR version 8 goes with opsets up to 18.
pub const IR_VERSION: i64 = 8;
/// The graph's input and output names.
pub const INPUT: &str = "input";
pub const OUTPUT: &str = "logits";

/// A graph under construction: nodes in topological order and their weights, and the traced
/// per-sample shape of every value.
pub struct Graph {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// The model's own tensors behind the initializers named here (flattened handles, no
    /// copy), whose `raw_data` is left empty until the file is written ([`OnnxModel`]).
    deferred: HashMap<String, Tensor<1>>,
    count: usize,
    /// `[C, H, W]` or `[F]` (no batch) of each value whose shape is known.
    shapes: HashMap<String, Vec<usize>>,
    /// Whether initializers carry the weights (false: a shape trace; nothing is copied).
    values: bool,
    convs: Vec<ConvLayer>,
    /// Multiply-adds x 2 of the convolutions and linear layers (per sample).
    flops: f64,
}

/// One traced convolution: what the kernel plan and the FLOP count read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvLayer {
    /// The module path of the convolution (`stages.1.0.convs.0.conv`, ...).
    pub name: String,
    pub cin: usize,
    pub cout: usize,
    /// Input height and width.
    pub hw: [usize; 2],
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl ConvLayer {
    /// Output height and width.
    pub fn out_hw(&self) -> [usize; 2] {
        [0, 1].map(|i| {
            let span = self.dilation[i] * (self.kernel[i] - 1) + 1;
            (self.hw[i] + self.pads[i] + self.pads[i + 2] - span) / self.stride[i] + 1
        })
    }

    /// Multiply-adds x 2 per sample.
    pub fn flops(&self) -> f64 {
        let [ho, wo] = self.out_hw();
        2.0 * (self.cout * self.cin / self.groups * self.kernel[0] * self.kernel[1] * ho * wo)
            as f64
    }
}

/// The output side of a pooling window (ONNX and PyTorch: with `ceil`, a last window that
/// would start inside the end padding is dropped).
fn pooled(n: usize, k: usize, s: usize, p0: usize, p1: usize, dil: usize, ceil: bool) -> usize {
    let span = dil * (k - 1) + 1;
    let room = n + p0 + p1 - span;
    let mut out = if ceil { room.div_ceil(s) } else { room / s } + 1;
    if ceil && (out - 1) * s >= n + p0 {
        out -= 1;
    }
    out
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.iter().map(|&x| x as i64).collect(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        f: v,
        r#type: attribute_type::FLOAT,
        ..Default::default()
    }
}

/// ONNX pads from Burn's padding; `Same` is resolved by the caller's layers never using it.
fn pads(p: &PaddingConfig2d) -> [usize; 4] {
    match *p {
        PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r],
        PaddingConfig2d::Valid => [0; 4],
        // No convlab layer uses `Same`; fail loudly rather than export a wrong graph.
        PaddingConfig2d::Same => panic!("`Same` padding has no fixed ONNX pads"),
    }
}

impl Graph {
    /// A graph whose input [`INPUT`] has per-sample shape `input_chw`.
    pub fn new(input_chw: [usize; 3]) -> Self {
        Graph {
            nodes: Vec::new(),
            inits: Vec::new(),
            deferred: HashMap::new(),
            count: 0,
            shapes: HashMap::from([(INPUT.to_string(), input_chw.to_vec())]),
            values: true,
            convs: Vec::new(),
            flops: 0.0,
        }
    }

    /// A shape trace: the same nodes and shapes, no weight values (nothing is initialised or
    /// copied, so tracing VGG-19 costs what listing its layers does).
    pub fn shapes_only(input_chw: [usize; 3]) -> Self {
        Graph {
            values: false,
            ..Self::new(input_chw)
        }
    }

    /// The per-sample shape of value `v` (`[C, H, W]` or `[F]`), where it is known.
    pub fn shape(&self, v: &str) -> Option<&[usize]> {
        self.shapes.get(v).map(Vec::as_slice)
    }

    /// The spatial size of value `v`; panics when `v` is not a traced `[C, H, W]` map (a
    /// family calling this on an untraced value is a bug, not bad input).
    pub fn hw(&self, v: &str) -> [usize; 2] {
        match self.shape(v) {
            Some(&[_, h, w]) => [h, w],
            other => panic!("`{v}` has no traced [C, H, W] shape: {other:?}"),
        }
    }

    /// The traced convolutions, in forward order.
    pub fn convs(&self) -> &[ConvLayer] {
        &self.convs
    }

    /// Multiply-adds x 2 per sample of the convolutions and linear layers traced so far.
    pub fn flops(&self) -> f64 {
        self.flops
    }

    fn set_shape(&mut self, v: &str, shape: Option<Vec<usize>>) {
        if let Some(shape) = shape {
            self.shapes.insert(v.to_string(), shape);
        }
    }

    /// `y` takes the shape of `x` (element-wise nodes).
    fn same_shape(&mut self, y: &str, x: &str) {
        let s = self.shapes.get(x).cloned();
        self.set_shape(y, s);
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.count += 1;
        format!("{hint}_{}", self.count)
    }

    /// A float initializer named `name`, holding `data` itself (no copy on little-endian CPUs).
    pub fn weight(&mut self, name: &str, dims: &[usize], data: Vec<f32>) -> String {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "{name}");
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: data_type::FLOAT,
            name: name.into(),
            raw_data: le_bytes_of(data),
        });
        name.to_string()
    }

    fn weight_i64(&mut self, name: &str, data: &[i64]) -> String {
        self.inits.push(TensorProto {
            dims: vec![data.len() as i64],
            data_type: data_type::INT64,
            name: name.into(),
            raw_data: le_bytes_of(data.to_vec()),
        });
        name.to_string()
    }

    /// An initializer holding a model tensor: a handle to it, copied to the host only when
    /// the file is written ([`OnnxModel::write`]).
    fn tensor_weight<const D: usize>(&mut self, name: &str, t: &Tensor<D>) -> String {
        if self.values {
            let n = t.shape().num_elements();
            self.inits.push(TensorProto {
                dims: t.dims().iter().map(|&d| d as i64).collect(),
                data_type: data_type::FLOAT,
                name: name.into(),
                raw_data: bytes::Bytes::new(),
            });
            // An empty tensor's `raw_data` stays empty, as prost would write it.
            if n > 0 {
                self.deferred
                    .insert(name.to_string(), t.clone().reshape([n]));
            }
        }
        name.to_string()
    }

    /// [`Self::tensor_weight`] of a parameter, not initialised in a shape trace.
    fn param_weight<const D: usize>(&mut self, name: &str, p: &Param<Tensor<D>>) -> String {
        if self.values {
            self.tensor_weight(name, &p.val())
        } else {
            name.to_string()
        }
    }

    /// One node with one output; returns the output's name.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        hint: &str,
    ) -> String {
        let out = self.fresh(hint);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: out.clone(),
            op_type: op.into(),
            attribute,
            domain: String::new(),
        });
        out
    }

    /// `Conv` with Burn's `[out, in / groups, kh, kw]` weight and optional bias.
    pub fn conv(&mut self, conv: &Conv2d, x: &str, name: &str) -> String {
        let w = self.param_weight(&format!("{name}.weight"), &conv.weight);
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &conv.bias {
            inputs.push(self.param_weight(&format!("{name}.bias"), b));
        }
        let dims = conv.weight.lazy_shape().to_vec();
        let traced = self.shape(x).map(|s| ConvLayer {
            name: name.to_string(),
            cin: s[0],
            cout: dims[0],
            hw: [s[1], s[2]],
            kernel: conv.kernel_size,
            stride: conv.stride,
            pads: pads(&conv.padding),
            dilation: conv.dilation,
            groups: conv.groups,
        });
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let attrs = vec![
            ints("kernel_shape", &conv.kernel_size),
            ints("strides", &conv.stride),
            ints("pads", &pads(&conv.padding)),
            ints("dilations", &conv.dilation),
            int("group", conv.groups as i64),
        ];
        let y = self.node("Conv", &inputs, attrs, name);
        if let Some(c) = traced {
            let [h, w] = c.out_hw();
            self.set_shape(&y, Some(vec![c.cout, h, w]));
            self.flops += c.flops();
            self.convs.push(c);
        }
        y
    }

    /// `BatchNormalization` in inference mode (running statistics).
    pub fn batch_norm(&mut self, bn: &BatchNorm, x: &str, name: &str) -> String {
        let s = self.param_weight(&format!("{name}.weight"), &bn.gamma);
        let b = self.param_weight(&format!("{name}.bias"), &bn.beta);
        let (m, v) = (
            format!("{name}.running_mean"),
            format!("{name}.running_var"),
        );
        if self.values {
            self.tensor_weight(&m, &bn.running_mean.value());
            self.tensor_weight(&v, &bn.running_var.value());
        }
        let y = self.node(
            "BatchNormalization",
            &[x, &s, &b, &m, &v],
            vec![float("epsilon", bn.epsilon as f32)],
            name,
        );
        self.same_shape(&y, x);
        y
    }

    /// Convolution, optional batch norm, optional ReLU.
    pub fn conv_bn(
        &mut self,
        conv: &Conv2d,
        bn: Option<&BatchNorm>,
        x: &str,
        relu: bool,
        name: &str,
    ) -> String {
        let mut y = self.conv(conv, x, &format!("{name}.conv"));
        if let Some(bn) = bn {
            y = self.batch_norm(bn, &y, &format!("{name}.bn"));
        }
        if relu { self.relu(&y) } else { y }
    }

    pub fn relu(&mut self, x: &str) -> String {
        let y = self.node("Relu", &[x], vec![], "relu");
        self.same_shape(&y, x);
        y
    }

    pub fn add(&mut self, a: &str, b: &str) -> String {
        let y = self.node("Add", &[a, b], vec![], "add");
        self.same_shape(&y, a);
        y
    }

    /// Concatenation along channels.
    pub fn concat(&mut self, xs: &[String]) -> String {
        let shapes: Option<Vec<Vec<usize>>> =
            xs.iter().map(|x| self.shapes.get(x).cloned()).collect();
        let xs: Vec<&str> = xs.iter().map(String::as_str).collect();
        let y = self.node("Concat", &xs, vec![int("axis", 1)], "concat");
        let shape = shapes.filter(|s| !s.is_empty()).map(|s| {
            let mut out = s[0].clone();
            out[0] = s.iter().map(|v| v[0]).sum();
            out
        });
        self.set_shape(&y, shape);
        y
    }

    /// The traced shape after a pooling window.
    #[allow(clippy::too_many_arguments)]
    fn pool_shape(
        &mut self,
        y: &str,
        x: &str,
        k: [usize; 2],
        s: [usize; 2],
        p: [usize; 4],
        dil: [usize; 2],
        ceil: bool,
    ) {
        let shape = self.shape(x).map(|sh| {
            let out = [0, 1].map(|i| pooled(sh[i + 1], k[i], s[i], p[i], p[i + 2], dil[i], ceil));
            vec![sh[0], out[0], out[1]]
        });
        self.set_shape(y, shape);
    }

    pub fn max_pool(&mut self, p: &MaxPool2d, x: &str) -> String {
        let attrs = vec![
            ints("kernel_shape", &p.kernel_size),
            ints("strides", &p.stride),
            ints("pads", &pads(&p.padding)),
            ints("dilations", &p.dilation),
            int("ceil_mode", p.ceil_mode as i64),
        ];
        let y = self.node("MaxPool", &[x], attrs, "maxpool");
        let (k, s, pd) = (p.kernel_size, p.stride, pads(&p.padding));
        self.pool_shape(&y, x, k, s, pd, p.dilation, p.ceil_mode);
        y
    }

    pub fn avg_pool(&mut self, p: &AvgPool2d, x: &str) -> String {
        let attrs = vec![
            ints("kernel_shape", &p.kernel_size),
            ints("strides", &p.stride),
            ints("pads", &pads(&p.padding)),
            int("ceil_mode", p.ceil_mode as i64),
            int("count_include_pad", p.count_include_pad as i64),
        ];
        let y = self.node("AveragePool", &[x], attrs, "avgpool");
        let (k, s, pd) = (p.kernel_size, p.stride, pads(&p.padding));
        self.pool_shape(&y, x, k, s, pd, [1, 1], p.ceil_mode);
        y
    }

    /// `LRN` with the constants of `l` (Burn's module does not expose them, so the caller
    /// passes the config it was built from).
    pub fn lrn(&mut self, l: &LocalResponseNormConfig, x: &str) -> String {
        let attrs = vec![
            int("size", l.size as i64),
            float("alpha", l.alpha as f32),
            float("beta", l.beta as f32),
            float("bias", l.k as f32),
        ];
        let y = self.node("LRN", &[x], attrs, "lrn");
        self.same_shape(&y, x);
        y
    }

    /// `[B, C, H, W]` -> `[B, C]`.
    pub fn global_avg_pool(&mut self, x: &str) -> String {
        let y = self.node("GlobalAveragePool", &[x], vec![], "gap");
        let shape = self.shape(x).map(|s| vec![s[0], 1, 1]);
        self.set_shape(&y, shape);
        self.flatten(&y)
    }

    pub fn flatten(&mut self, x: &str) -> String {
        let y = self.node("Flatten", &[x], vec![int("axis", 1)], "flatten");
        let shape = self.shape(x).map(|s| vec![s.iter().product()]);
        self.set_shape(&y, shape);
        y
    }

    /// Adaptive average pooling of an `[B, C, h, w]` map to `p x p`, flattened to
    /// `[B, C * p * p]` (the order of a row-major reshape). ONNX has no adaptive pool: an exact
    /// division is one `AveragePool`, any other size a `MatMul` with the constant averaging
    /// matrix of PyTorch's rule (cell `i` averages rows `floor(i h / p) .. ceil((i + 1) h / p)`).
    pub fn adaptive_avg_pool_flat(&mut self, x: &str, p: usize) -> String {
        let hw = self.hw(x);
        let y = self.adaptive_avg_pool_nodes(x, hw, p);
        let shape = self.shape(x).map(|s| vec![s[0] * p * p]);
        self.set_shape(&y, shape);
        y
    }

    fn adaptive_avg_pool_nodes(&mut self, x: &str, hw: [usize; 2], p: usize) -> String {
        let [h, w] = hw;
        if h == p && w == p {
            return self.flatten(x);
        }
        if h % p == 0 && w % p == 0 {
            let k = [h / p, w / p];
            let attrs = vec![
                ints("kernel_shape", &k),
                ints("strides", &k),
                ints("pads", &[0; 4]),
            ];
            let y = self.node("AveragePool", &[x], attrs, "adaptive_pool");
            return self.flatten(&y);
        }
        let mut m = vec![0f32; h * w * p * p];
        for (oi, (ri0, ri1)) in (0..p)
            .map(|i| (i * h / p, ((i + 1) * h).div_ceil(p)))
            .enumerate()
        {
            for (oj, (rj0, rj1)) in (0..p)
                .map(|j| (j * w / p, ((j + 1) * w).div_ceil(p)))
                .enumerate()
            {
                let n = ((ri1 - ri0) * (rj1 - rj0)) as f32;
                for r in ri0..ri1 {
                    for c in rj0..rj1 {
                        m[(r * w + c) * p * p + oi * p + oj] = 1.0 / n;
                    }
                }
            }
        }
        let name = self.fresh("adaptive_pool_matrix");
        let mat = if self.values {
            self.weight(&name, &[h * w, p * p], m)
        } else {
            name
        };
        let name = self.fresh("adaptive_pool_shape");
        // `0` copies the (dynamic) batch size, `-1` is the channels.
        let shape = self.weight_i64(&name, &[0, -1, (h * w) as i64]);
        let flat = self.node("Reshape", &[x, &shape], vec![], "reshape");
        let y = self.node("MatMul", &[&flat, &mat], vec![], "adaptive_pool");
        self.flatten(&y)
    }

    /// `Gemm`: `[B, in]` -> `[B, out]` with Burn's `[in, out]` weight.
    pub fn linear(&mut self, l: &Linear, x: &str, name: &str) -> String {
        let w = self.param_weight(&format!("{name}.weight"), &l.weight);
        let mut inputs = vec![x.to_string(), w];
        if let Some(b) = &l.bias {
            inputs.push(self.param_weight(&format!("{name}.bias"), b));
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let y = self.node("Gemm", &inputs, vec![], name);
        let d = l.weight.lazy_shape().to_vec();
        let (fin, fout) = (d[0], d[1]);
        self.flops += 2.0 * (fin * fout) as f64;
        self.set_shape(&y, Some(vec![fout]));
        y
    }

    /// The finished model: input `[batch, c, h, w]` (batch dynamic), output `[batch, k]`
    /// (renamed to [`OUTPUT`]), with `metadata` as key/value properties.
    pub fn finish(
        mut self,
        out: &str,
        input_chw: [usize; 3],
        classes: usize,
        metadata: &[(&str, String)],
    ) -> OnnxModel {
        for n in &mut self.nodes {
            for o in &mut n.output {
                if o == out {
                    *o = OUTPUT.into();
                }
            }
        }
        let dim = |v: usize| Dimension {
            dim_value: Some(v as i64),
            dim_param: None,
        };
        let batch = Dimension {
            dim_value: None,
            dim_param: Some("batch".into()),
        };
        let value = |name: &str, dims: Vec<Dimension>| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                tensor_type: Some(TypeProtoTensor {
                    elem_type: data_type::FLOAT,
                    shape: Some(TensorShapeProto { dim: dims }),
                }),
            }),
        };
        let [c, h, w] = input_chw;
        let proto = ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "convlab".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            doc_string: String::new(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: "convlab".into(),
                initializer: self.inits,
                doc_string: String::new(),
                input: vec![value(INPUT, vec![batch.clone(), dim(c), dim(h), dim(w)])],
                output: vec![value(OUTPUT, vec![batch, dim(classes)])],
            }),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: k.to_string(),
                    value: v.clone(),
                })
                .collect(),
        };
        OnnxModel {
            proto,
            deferred: self.deferred,
        }
    }
}

/// A finished ONNX model whose weights are still the traced model's tensors: each is copied
/// to the host a slice at a time as the file is written, so exporting a VGG-16 holds its
/// 0.5 GB of weights once (the model's) instead of twice (the model's and the graph's).
pub struct OnnxModel {
    /// The graph; initializers of model tensors have empty `raw_data` here.
    proto: ModelProto,
    deferred: HashMap<String, Tensor<1>>,
}

impl OnnxModel {
    /// The graph, nodes and shapes; the initializers that hold model tensors have no
    /// `raw_data` yet ([`Self::into_proto`] fills it).
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// The whole model in memory, every initializer's values copied in.
    pub fn into_proto(mut self) -> ModelProto {
        if let Some(g) = &mut self.proto.graph {
            for t in &mut g.initializer {
                if let Some(d) = self.deferred.remove(&t.name) {
                    t.raw_data = le_bytes_of(crate::helpers::host(d));
                }
            }
        }
        self.proto
    }

    /// The file's bytes ([`Self::write`] into memory).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_chunked(&mut out, 1 << 20)
            .expect("writing to a Vec cannot fail");
        out
    }

    /// Writes the model to `out` streamed through a 1 MB buffer, each model tensor copied
    /// from the device in 1 MB slices; the bytes are [`encode`] of [`Self::into_proto`].
    pub fn write(&self, out: impl std::io::Write) -> std::io::Result<()> {
        self.write_chunked(out, 1 << 20)
    }

    fn write_chunked(&self, out: impl std::io::Write, chunk: usize) -> std::io::Result<()> {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let mut w = Chunked {
            buf: Vec::with_capacity(chunk),
            chunk,
            out,
            written: 0,
            err: None,
        };
        let m = &self.proto;
        // prost writes a message's fields in tag order and leaves out those at their default,
        // so messages holding disjoint fields, written one after another in tag order, are the
        // bytes of the whole: ModelProto's fields before `graph` (tags 1-6), the graph (7), the
        // fields after it (8, 14); inside the graph, those before `initializer` (1, 2), each
        // initializer (5), those after (10-12).
        let model_head = ModelProto {
            ir_version: m.ir_version,
            producer_name: m.producer_name.clone(),
            producer_version: m.producer_version.clone(),
            doc_string: m.doc_string.clone(),
            ..Default::default()
        };
        let model_tail = ModelProto {
            opset_import: m.opset_import.clone(),
            metadata_props: m.metadata_props.clone(),
            ..Default::default()
        };
        put(&model_head, &mut w)?;
        if let Some(g) = &m.graph {
            let head = GraphProto {
                node: g.node.clone(),
                name: g.name.clone(),
                ..Default::default()
            };
            let tail = GraphProto {
                doc_string: g.doc_string.clone(),
                input: g.input.clone(),
                output: g.output.clone(),
                ..Default::default()
            };
            // An initializer's length with its deferred `raw_data` (tag 9) appended.
            let values = |t: &TensorProto| self.deferred.get(&t.name).map(|d| 4 * d.dims()[0]);
            let init_len = |t: &TensorProto| {
                t.encoded_len()
                    + values(t).map_or(0, |n| key_len(9) + encoded_len_varint(n as u64) + n)
            };
            let inits: usize = g
                .initializer
                .iter()
                .map(|t| {
                    let n = init_len(t);
                    key_len(5) + encoded_len_varint(n as u64) + n
                })
                .sum();
            let graph_len = head.encoded_len() + inits + tail.encoded_len();
            encode_key(7, WireType::LengthDelimited, &mut w);
            encode_varint(graph_len as u64, &mut w);
            put(&head, &mut w)?;
            for t in &g.initializer {
                // A failed write (a full disk) ends the file: the rest need not be copied.
                if w.err.is_some() {
                    break;
                }
                encode_key(5, WireType::LengthDelimited, &mut w);
                encode_varint(init_len(t) as u64, &mut w);
                put(t, &mut w)?;
                if let Some(d) = self.deferred.get(&t.name) {
                    encode_key(9, WireType::LengthDelimited, &mut w);
                    encode_varint(4 * d.dims()[0] as u64, &mut w);
                    crate::helpers::for_each_host_slice(d, 1 << 18, |part| {
                        bytes::BufMut::put_slice(&mut w, &crate::helpers::le_bytes(part));
                    });
                }
            }
            put(&tail, &mut w)?;
        }
        put(&model_tail, &mut w)?;
        w.flush();
        w.err.map_or(Ok(()), Err)
    }
}

/// Serialises a model to bytes.
pub fn encode(m: &ModelProto) -> Vec<u8> {
    m.encode_to_vec()
}

/// `msg`'s fields, without a length prefix.
fn put(msg: &impl Message, w: &mut impl bytes::BufMut) -> std::io::Result<()> {
    msg.encode(w).map_err(std::io::Error::other)
}

/// A [`bytes::BufMut`] that hands its bytes to a writer whenever `chunk` of them have gathered.
/// `BufMut` cannot fail, so the first write error is kept (and later bytes dropped) for
/// [`OnnxModel::write`] to return.
struct Chunked<W> {
    buf: Vec<u8>,
    chunk: usize,
    out: W,
    written: usize,
    err: Option<std::io::Error>,
}

impl<W: std::io::Write> Chunked<W> {
    fn flush(&mut self) {
        if self.err.is_none()
            && let Err(e) = self.out.write_all(&self.buf)
        {
            self.err = Some(e);
        }
        self.written += self.buf.len();
        self.buf.clear();
    }
}

// SAFETY: every method delegates to the inner `Vec<u8>`'s own `BufMut`, whose contract holds:
// `chunk_mut` is the vector's spare capacity (flushed, then at least `chunk` bytes, when full)
// and `advance_mut` passes on the caller's promise that those bytes are now initialised; a
// flush only empties the vector between calls. `remaining_mut` counts what was flushed too.
unsafe impl<W: std::io::Write> bytes::BufMut for Chunked<W> {
    fn remaining_mut(&self) -> usize {
        (isize::MAX as usize) - self.written - self.buf.len()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of the slice `chunk_mut` returned, which
        // is the vector's spare capacity.
        unsafe { self.buf.advance_mut(cnt) };
        if self.buf.len() >= self.chunk {
            self.flush();
        }
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        if self.buf.len() >= self.chunk {
            self.flush();
        }
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(self.chunk);
        }
        self.buf.chunk_mut()
    }
}

/// Parses bytes written by [`encode`] (or any ONNX file using only these fields). The
/// initializers' `raw_data` are slices of `bytes` (pass the `Vec` itself, not a copy).
pub fn decode(bytes: impl Into<bytes::Bytes>) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes.into())
}

/// `values` as little-endian bytes, owned by the returned `Bytes`: on a little-endian CPU the
/// vector's own buffer, viewed as bytes (a VGG's weights are 0.5 GB; copying them into a
/// `Vec<u8>` had doubled an export's memory for a moment).
fn le_bytes_of<T: bytemuck::Pod + Send + Sync>(values: Vec<T>) -> bytes::Bytes {
    struct LeBytes<T>(Vec<T>);
    impl<T: bytemuck::Pod> AsRef<[u8]> for LeBytes<T> {
        fn as_ref(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
    }
    if cfg!(target_endian = "little") {
        bytes::Bytes::from_owner(LeBytes(values))
    } else {
        bytes::Bytes::from(crate::helpers::le_bytes(&values).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_pool_matrix_rows_average_pytorch_regions() {
        // 5 -> 3: regions [0,2), [1,4), [3,5) (floor start, ceil end).
        let mut g = Graph::new([2, 5, 1]);
        g.adaptive_avg_pool_flat(INPUT, 3);
        let m = g
            .inits
            .iter()
            .find(|t| t.name.starts_with("adaptive_pool_matrix"));
        // p = 3 on a 5 x 1 map is not an exact division in h, and w = 1 != 3: the MatMul path.
        let m = m.expect("matrix");
        assert_eq!(m.dims, vec![5, 9]);
        let vals: Vec<f32> = m
            .raw_data
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // Output cell (0, 0) averages input rows 0 and 1 (column 0, the only one).
        let col = |o: usize| (0..5).map(|r| vals[r * 9 + o]).collect::<Vec<_>>();
        assert_eq!(col(0), vec![0.5, 0.5, 0.0, 0.0, 0.0]);
        let third = 1.0 / 3.0;
        assert_eq!(col(3), vec![0.0, third, third, third, 0.0]);
        assert_eq!(col(6), vec![0.0, 0.0, 0.0, 0.5, 0.5]);
    }

    /// A graph with a host initializer and model tensors: a conv with bias, a batch norm,
    /// and a linear layer of 300,000 weights (more than one 2^18-value slice).
    fn traced() -> (OnnxModel, Vec<f32>) {
        use burn::nn::conv::Conv2dConfig;
        use burn::nn::{BatchNormConfig, LinearConfig};
        let device = Device::flex();
        let mut g = Graph::new([3, 8, 8]);
        g.weight("w", &[5, 7], (0..35).map(|v| v as f32 * 0.5).collect());
        let conv = Conv2dConfig::new([3, 4], [3, 3]).init(&device);
        let bn = BatchNormConfig::new(4).init(&device);
        let fc = LinearConfig::new(600, 500).init(&device);
        let y = g.conv_bn(&conv, Some(&bn), INPUT, true, "c");
        let y = g.linear(&fc, &y, "fc");
        let fc_weight = crate::helpers::host(fc.weight.val());
        (
            g.finish(&y, [3, 8, 8], 500, &[("k", "v".into())]),
            fc_weight,
        )
    }

    #[test]
    fn a_streamed_model_is_the_encoded_bytes() {
        let (m, fc_weight) = traced();
        assert_eq!(m.deferred.len(), 8, "conv w/b, bn w/b/mean/var, fc w/b");
        let mut streamed = Vec::new();
        // Chunks smaller than a field, one byte, and larger than the whole model.
        for chunk in [1, 7, 64, 1 << 20, 1 << 24] {
            let mut got = Vec::new();
            m.write_chunked(&mut got, chunk).unwrap();
            streamed.push(got);
        }
        // A failing writer's error comes back.
        struct Full;
        impl std::io::Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let e = m.write_chunked(Full, 16).unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        let (encoded, proto) = (m.encode(), m.into_proto());
        let want = encode(&proto);
        assert_eq!(encoded, want);
        for got in streamed {
            assert_eq!(got, want);
        }
        // The filled-in initializers hold the layers' values.
        let inits = &proto.graph.as_ref().unwrap().initializer;
        let init = |name: &str| inits.iter().find(|t| t.name == name).unwrap();
        assert_eq!(init("fc.weight").dims, vec![600, 500]);
        let fc_bytes = crate::helpers::le_bytes(&fc_weight);
        assert_eq!(init("fc.weight").raw_data[..], fc_bytes[..]);
        let ones = 1f32.to_le_bytes().repeat(4);
        assert_eq!(init("c.bn.running_var").raw_data, ones);
    }

    #[test]
    fn a_model_survives_encode_and_decode() {
        let mut g = Graph::new([3, 8, 8]);
        let y = g.relu(INPUT);
        let y = g.global_avg_pool(&y);
        let m = g.finish(&y, [3, 8, 8], 3, &[("k", "v".into())]);
        let back = decode(m.encode()).unwrap();
        let m = m.into_proto();
        assert_eq!(back, m);
        let graph = back.graph.unwrap();
        assert_eq!(graph.node.last().unwrap().output, vec![OUTPUT.to_string()]);
        assert_eq!(graph.input[0].name, INPUT);
    }
}
