//! Models out as ONNX: the graph of every registered model parses back with the right input,
//! output, node types and initializer shapes, and for one model of each kind of layer a plain
//! host-side evaluator of the parsed graph (written here from the ONNX operator specs, sharing
//! no code with convlab's kernels) reproduces convlab's logits within 1e-4 of their scale. The
//! onnxruntime check is `tools/export_parity.py`.

use crate::common;

use common::{build, uniform};
use std::collections::HashMap;

use burn::prelude::*;
use convlab::models::{Model, ModelConfig, ModelName};
use convlab::onnx::proto::{ModelProto, NodeProto, TensorProto};
use convlab::params::module_shapes;

use common::ONE_AT_A_TIME;

fn attr_ints(n: &NodeProto, name: &str) -> Vec<usize> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.iter().map(|&v| v as usize).collect())
        .unwrap_or_default()
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

fn attr_f(n: &NodeProto, name: &str, default: f32) -> f32 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.f)
}

/// A host tensor: shape and row-major values (int64 initializers are stored as f32).
#[derive(Clone)]
struct T {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn tensor_of(t: &TensorProto) -> T {
    let shape: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    let data = match t.data_type {
        1 => t
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        7 => t
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        d => panic!("data type {d}"),
    };
    T { shape, data }
}

/// Output side of a pooling/conv window, ONNX/PyTorch rule: in ceil mode a last window that
/// would start in the right padding is dropped.
fn out_side(n: usize, k: usize, s: usize, p0: usize, p1: usize, d: usize, ceil: bool) -> usize {
    let span = n + p0 + p1 - d * (k - 1) - 1;
    let mut o = if ceil { span.div_ceil(s) } else { span / s } + 1;
    if ceil && (o - 1) * s >= n + p0 {
        o -= 1;
    }
    o
}

fn conv(x: &T, w: &T, b: Option<&T>, n: &NodeProto) -> T {
    let [bn, c, h, wd] = x.shape[..] else {
        panic!()
    };
    let [o, cg, kh, kw] = w.shape[..] else {
        panic!()
    };
    let (s, p, d) = (
        attr_ints(n, "strides"),
        attr_ints(n, "pads"),
        attr_ints(n, "dilations"),
    );
    let g = attr_i(n, "group", 1) as usize;
    assert_eq!(c, cg * g);
    let oh = out_side(h, kh, s[0], p[0], p[2], d[0], false);
    let ow = out_side(wd, kw, s[1], p[1], p[3], d[1], false);
    let mut y = vec![0f32; bn * o * oh * ow];
    let og = o / g;
    for bi in 0..bn {
        for oc in 0..o {
            let gi = oc / og;
            let base = b.map_or(0.0, |b| b.data[oc]);
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = base as f64;
                    for ci in 0..cg {
                        let ic = gi * cg + ci;
                        for ky in 0..kh {
                            let iy = (oy * s[0] + ky * d[0]) as isize - p[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * s[1] + kx * d[1]) as isize - p[1] as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                let xv =
                                    x.data[((bi * c + ic) * h + iy as usize) * wd + ix as usize];
                                let wv = w.data[((oc * cg + ci) * kh + ky) * kw + kx];
                                acc += (xv * wv) as f64;
                            }
                        }
                    }
                    y[((bi * o + oc) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    T {
        shape: vec![bn, o, oh, ow],
        data: y,
    }
}

fn pool(x: &T, n: &NodeProto, max: bool) -> T {
    let [bn, c, h, w] = x.shape[..] else { panic!() };
    let (k, s, p) = (
        attr_ints(n, "kernel_shape"),
        attr_ints(n, "strides"),
        attr_ints(n, "pads"),
    );
    let ceil = attr_i(n, "ceil_mode", 0) == 1;
    let include = attr_i(n, "count_include_pad", 0) == 1;
    let oh = out_side(h, k[0], s[0], p[0], p[2], 1, ceil);
    let ow = out_side(w, k[1], s[1], p[1], p[3], 1, ceil);
    let mut y = vec![0f32; bn * c * oh * ow];
    for bc in 0..bn * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut acc, mut m, mut count, mut padded) = (0f64, f32::NEG_INFINITY, 0, 0);
                for ky in 0..k[0] {
                    for kx in 0..k[1] {
                        let iy = (oy * s[0] + ky) as isize - p[0] as isize;
                        let ix = (ox * s[1] + kx) as isize - p[1] as isize;
                        let in_pad = iy < (h + p[2]) as isize && ix < (w + p[3]) as isize;
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            padded += usize::from(in_pad);
                            continue;
                        }
                        let v = x.data[(bc * h + iy as usize) * w + ix as usize];
                        m = m.max(v);
                        acc += v as f64;
                        count += 1;
                    }
                }
                y[(bc * oh + oy) * ow + ox] = if max {
                    m
                } else {
                    (acc / (count + if include { padded } else { 0 }) as f64) as f32
                };
            }
        }
    }
    T {
        shape: vec![bn, c, oh, ow],
        data: y,
    }
}

/// Runs the parsed graph on `x` with the operator semantics of the ONNX specs.
fn evaluate(m: &ModelProto, x: T) -> T {
    let g = m.graph.as_ref().unwrap();
    let mut v: HashMap<String, T> = g
        .initializer
        .iter()
        .map(|t| (t.name.clone(), tensor_of(t)))
        .collect();
    v.insert(g.input[0].name.clone(), x);
    for n in &g.node {
        let i = |k: usize| v[&n.input[k]].clone();
        let y = match n.op_type.as_str() {
            "Conv" => {
                let b = (n.input.len() > 2).then(|| i(2));
                conv(&i(0), &i(1), b.as_ref(), n)
            }
            "BatchNormalization" => {
                let (mut x, sc, b, mean, var) = (i(0), i(1), i(2), i(3), i(4));
                let eps = attr_f(n, "epsilon", 1e-5);
                let (c, hw) = (x.shape[1], x.shape[2] * x.shape[3]);
                for (j, val) in x.data.iter_mut().enumerate() {
                    let ch = (j / hw) % c;
                    *val = (*val - mean.data[ch]) / (var.data[ch] + eps).sqrt() * sc.data[ch]
                        + b.data[ch];
                }
                x
            }
            "Relu" => {
                let mut x = i(0);
                x.data.iter_mut().for_each(|a| *a = a.max(0.0));
                x
            }
            "MaxPool" => pool(&i(0), n, true),
            "AveragePool" => pool(&i(0), n, false),
            "LRN" => {
                let x = i(0);
                let size = attr_i(n, "size", 0) as usize;
                let (alpha, beta, bias) = (
                    attr_f(n, "alpha", 1e-4),
                    attr_f(n, "beta", 0.75),
                    attr_f(n, "bias", 1.0),
                );
                let (c, hw) = (x.shape[1], x.shape[2] * x.shape[3]);
                let mut y = x.clone();
                for (j, out) in y.data.iter_mut().enumerate() {
                    let (b, ch, p) = (j / (c * hw), (j / hw) % c, j % hw);
                    let lo = ch.saturating_sub((size - 1) / 2);
                    let hi = (ch + size.div_ceil(2) - 1).min(c - 1);
                    let sq: f32 = (lo..=hi)
                        .map(|cc| x.data[(b * c + cc) * hw + p].powi(2))
                        .sum();
                    *out = x.data[j] / (bias + alpha / size as f32 * sq).powf(beta);
                }
                y
            }
            "Concat" => {
                let xs: Vec<T> = (0..n.input.len()).map(i).collect();
                let (b, hw) = (xs[0].shape[0], xs[0].shape[2] * xs[0].shape[3]);
                let c: usize = xs.iter().map(|t| t.shape[1]).sum();
                let mut data = Vec::with_capacity(b * c * hw);
                for bi in 0..b {
                    for t in &xs {
                        let n = t.shape[1] * hw;
                        data.extend_from_slice(&t.data[bi * n..(bi + 1) * n]);
                    }
                }
                T {
                    shape: vec![b, c, xs[0].shape[2], xs[0].shape[3]],
                    data,
                }
            }
            "Add" => {
                let (mut a, b) = (i(0), i(1));
                assert_eq!(a.shape, b.shape);
                a.data.iter_mut().zip(&b.data).for_each(|(x, y)| *x += y);
                a
            }
            "GlobalAveragePool" => {
                let x = i(0);
                let hw = x.shape[2] * x.shape[3];
                T {
                    shape: vec![x.shape[0], x.shape[1], 1, 1],
                    data: x
                        .data
                        .chunks(hw)
                        .map(|c| (c.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32)
                        .collect(),
                }
            }
            "Flatten" => {
                let x = i(0);
                T {
                    shape: vec![x.shape[0], x.shape[1..].iter().product()],
                    data: x.data,
                }
            }
            "Reshape" => {
                let (x, s) = (i(0), i(1));
                let mut shape: Vec<isize> = s
                    .data
                    .iter()
                    .enumerate()
                    .map(|(d, &v)| {
                        if v == 0.0 {
                            x.shape[d] as isize
                        } else {
                            v as isize
                        }
                    })
                    .collect();
                let known: isize = shape.iter().filter(|&&d| d > 0).product();
                for d in shape.iter_mut().filter(|d| **d < 0) {
                    *d = x.data.len() as isize / known;
                }
                T {
                    shape: shape.into_iter().map(|d| d as usize).collect(),
                    data: x.data,
                }
            }
            "MatMul" | "Gemm" => {
                let (a, b) = (i(0), i(1));
                let (k, m) = (b.shape[0], b.shape[1]);
                let rows = a.data.len() / k;
                let bias = (n.input.len() > 2).then(|| i(2));
                let mut data = vec![0f32; rows * m];
                for r in 0..rows {
                    for j in 0..m {
                        let mut acc = bias.as_ref().map_or(0.0, |b| b.data[j]) as f64;
                        for t in 0..k {
                            acc += (a.data[r * k + t] * b.data[t * m + j]) as f64;
                        }
                        data[r * m + j] = acc as f32;
                    }
                }
                let mut shape = a.shape.clone();
                *shape.last_mut().unwrap() = m;
                T { shape, data }
            }
            op => panic!("unexpected op {op}"),
        };
        v.insert(n.output[0].clone(), y);
    }
    v.remove(&g.output[0].name).expect("graph output computed")
}

fn dims(m: &ModelProto, input: bool) -> Vec<String> {
    let g = m.graph.as_ref().unwrap();
    let vi = if input { &g.input[0] } else { &g.output[0] };
    let shape = vi
        .r#type
        .as_ref()
        .unwrap()
        .tensor_type
        .as_ref()
        .unwrap()
        .shape
        .as_ref()
        .unwrap();
    shape
        .dim
        .iter()
        .map(|d| match (&d.dim_value, &d.dim_param) {
            (Some(v), _) => v.to_string(),
            (_, Some(p)) => p.clone(),
            _ => "?".into(),
        })
        .collect()
}

/// Parses the encoded graph back and checks its interface, node types and initializers against
/// the model it came from.
fn check_structure(name: ModelName, model: &Model, m: &ModelProto, size: usize) {
    let g = m.graph.as_ref().unwrap();
    assert_eq!(m.opset_import[0].version, 17);
    assert_eq!(
        dims(m, true),
        ["batch", "3", &size.to_string(), &size.to_string()]
    );
    assert_eq!(dims(m, false), ["batch", &model.num_classes().to_string()]);
    let count = |op: &str| g.node.iter().filter(|n| n.op_type == op).count();
    // Every convlab tensor but the auxiliary heads' is an initializer of the same shape.
    let shapes = module_shapes(model);
    let inits: HashMap<&str, Vec<usize>> = g
        .initializer
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.dims.iter().map(|&d| d as usize).collect(),
            )
        })
        .collect();
    let exported: Vec<(&String, &Vec<usize>)> = shapes
        .iter()
        .filter(|(k, _)| !k.contains(".aux."))
        .collect();
    for (k, s) in &exported {
        // Initializers are named by module path without the family prefix.
        let short = k.split_once('.').unwrap().1;
        let short = short
            .replace(".bn.gamma", ".bn.weight")
            .replace(".bn.beta", ".bn.bias");
        assert_eq!(
            inits.get(short.as_str()),
            Some(*s),
            "{name}: initializer `{short}`"
        );
    }
    let convs = exported
        .iter()
        .filter(|(k, s)| s.len() == 4 && k.ends_with("weight"))
        .count();
    let bns = exported
        .iter()
        .filter(|(k, _)| k.ends_with("running_var"))
        .count();
    let linears = exported
        .iter()
        .filter(|(k, s)| s.len() == 2 && k.ends_with("weight"))
        .count();
    assert_eq!(count("Conv"), convs, "{name}: Conv nodes");
    assert_eq!(count("BatchNormalization"), bns, "{name}: BN nodes");
    assert_eq!(count("Gemm"), linears, "{name}: Gemm nodes");
    assert_eq!(count("Dropout"), 0);
    assert!(count("Relu") > 0, "{name}: no ReLU");
    let family_ops: &[&str] = match name.family() {
        convlab::models::Family::GoogLeNet => &["Concat", "MaxPool"],
        convlab::models::Family::ResNet => &["Add", "GlobalAveragePool"],
        _ => &["MaxPool"],
    };
    for op in family_ops {
        assert!(count(op) > 0, "{name}: no {op}");
    }
    let allowed = [
        "Conv",
        "BatchNormalization",
        "Relu",
        "MaxPool",
        "AveragePool",
        "LRN",
        "Concat",
        "Add",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
        "Reshape",
        "MatMul",
    ];
    assert!(g.node.iter().all(|n| allowed.contains(&n.op_type.as_str())));
}

#[test]
fn onnx_graph_of_every_registered_model_parses_back_with_its_structure() {
    let device = Device::flex();
    for &name in ModelName::ALL {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let size = name.default_input_size();
        let cfg = ModelConfig::for_model(name, 10, 3);
        let model = cfg.build(&device).unwrap();
        let proto = model.to_onnx([3, size, size], &[]);
        let bytes = proto.encode();
        let back = convlab::onnx::decode(bytes).unwrap();
        check_structure(name, &model, &back, size);
    }
}

#[test]
fn onnx_graphs_compute_convlabs_logits() {
    let device = Device::flex();
    use ModelName::*;
    // One model per kind of layer: the small variants at their size (1x1 convs, LRN, all
    // pools), and at 72 px, where ceil-mode pools and ResNet-D's 2x2 ceil-mode shortcut pool
    // meet odd sizes and AlexNet's adaptive pool has no exact division: the paper's AlexNet
    // (LRN, grouped convs), VGG-BN (conv bias under BN; 1x1 map pooled up to 7x7), both
    // GoogLeNets, basic and bottleneck ResNets. The other models run through the same code
    // with other configs; tools/export_parity.py runs every one in onnxruntime.
    let cases = [
        (ConvnetSmall, 28),
        (BenchVgg, 32),
        (AlexnetSmall, 32),
        (ZfnetSmall, 32),
        (Vgg11Small, 32),
        (GooglenetSmall, 32),
        (Resnet18Small, 32),
        (AlexnetPaper, 72),
        (Vgg11Bn, 32),
        (Googlenet, 72),
        (GooglenetTv, 72),
        (Resnet18, 72),
        (Resnet50, 64),
        (Resnet50D, 72),
    ];
    // Not under ONE_AT_A_TIME: these models are small (the largest is VGG-11-BN's 130 M
    // parameters at 32 px), so this runs beside the structure test on the other core.
    for (name, size) in cases {
        let model = build(name, 7, size);
        let n = 2 * 3 * size * size;
        let x: Vec<f32> = uniform(n, 12345).map(|v| v as f32).collect();
        let xt = Tensor::<4>::from_data(TensorData::new(x.clone(), [2, 3, size, size]), &device);
        let want: Vec<f32> = model
            .forward(xt)
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        let proto = model.to_onnx([3, size, size], &[]);
        let back = convlab::onnx::decode(proto.encode()).unwrap();
        let got = evaluate(
            &back,
            T {
                shape: vec![2, 3, size, size],
                data: x,
            },
        );
        assert_eq!(got.shape, vec![2, 7], "{name}");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let diff = want
            .iter()
            .zip(&got.data)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{name} at {size} px: max |convlab - onnx| = {diff:e}, logits scale {scale:e}"
        );
    }
}
