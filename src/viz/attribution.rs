//! Which pixels matter: saliency (Simonyan et al. 2014), guided backpropagation (Springenberg
//! et al. 2015), the ZFNet deconvnet (Zeiler & Fergus 2014, section 2.1), Grad-CAM (Selvaraju
//! et al. 2017) and the occlusion experiment (Zeiler & Fergus, section 4.2).
//!
//! The model must be on an autodiff device and frozen (`Module::freeze`): batch norm then uses
//! its running statistics, dropout is off, and only the input (or a probe) carries gradients.
//!
//! Deconvnet and guided backpropagation differ from the gradient only at the ReLUs, so for the
//! sequential families (AlexNet, ZFNet, VGG, the plain convnets) they are computed layer by
//! layer: each conv, batch norm, LRN and pool is inverted by its own vector-Jacobian product
//! (for max pooling that is exactly the deconvnet's unpooling with the recorded switches; for a
//! conv, the transposed filters), and the ReLU rule is applied in between. ResNet and GoogLeNet
//! branch and merge, which a layer list cannot describe; for them these two fall back to the
//! plain gradient, and the result says so.

use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, LocalResponseNorm};
use burn::prelude::*;
use burn::tensor::activation::{relu, softmax};

use crate::error::{Error, Result};
use crate::layers::Pool;
use crate::models::Model;

/// One step of a sequential network.
enum Op<'a> {
    Conv(&'a Conv2d),
    Bn(&'a BatchNorm),
    Lrn(&'a LocalResponseNorm),
    Relu,
    Pool(&'a Pool),
    /// A named map (`conv3`, `pool2`): where projections can start.
    Tap(String),
}

impl Op<'_> {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Op::Conv(c) => c.forward(x),
            Op::Bn(b) => b.forward(x),
            Op::Lrn(l) => l.forward(x),
            Op::Relu => relu(x),
            Op::Pool(p) => p.forward(x),
            Op::Tap(_) => x,
        }
    }
}

/// The layer list of a sequential model, or `None` for branching ones.
fn sequential(model: &Model) -> Option<Vec<Op<'_>>> {
    let mut ops = Vec::new();
    match model {
        Model::AlexNet(m) => {
            let mut p = 0;
            for i in 0..m.convs.len() {
                ops.push(Op::Conv(&m.convs[i]));
                if let Some(b) = &m.bns[i] {
                    ops.push(Op::Bn(b));
                }
                ops.push(Op::Relu);
                if let Some(l) = &m.lrns[i] {
                    ops.push(Op::Lrn(l));
                }
                ops.push(Op::Tap(format!("conv{}", i + 1)));
                if let Some(pool) = &m.pools[i] {
                    p += 1;
                    ops.push(Op::Pool(pool));
                    ops.push(Op::Tap(format!("pool{p}")));
                }
            }
        }
        Model::ConvNet(_) | Model::Vgg(_) => {
            let t = match model {
                Model::ConvNet(m) => &m.trunk,
                Model::Vgg(m) => &m.trunk,
                _ => unreachable!(),
            };
            let mut pool_i = 0;
            for (i, c) in t.convs.iter().enumerate() {
                ops.push(Op::Conv(&c.conv));
                if let Some(b) = &c.bn {
                    ops.push(Op::Bn(b));
                }
                ops.push(Op::Relu);
                if i == 0
                    && let Some(l) = &t.lrn
                {
                    ops.push(Op::Lrn(l));
                }
                ops.push(Op::Tap(format!("conv{}", i + 1)));
                for _ in 0..t.pools_after[i] {
                    ops.push(Op::Pool(&t.pools[pool_i]));
                    pool_i += 1;
                    ops.push(Op::Tap(format!("pool{pool_i}")));
                }
            }
        }
        _ => return None,
    }
    Some(ops)
}

/// `J^T g` of `op` at `x`: the signal `g` at the op's output carried back to its input.
fn vjp(op: &Op, x: &Tensor<4>, g: Tensor<4>) -> Tensor<4> {
    let x = x.clone().detach().require_grad();
    let y = op.forward(x.clone());
    let grads = (y * g.detach()).sum().backward();
    Tensor::from_inner(x.grad(&grads).expect("input requires grad"))
}

/// How a backward projection passes a ReLU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReluRule {
    /// The gradient: pass where the forward input was positive.
    Gradient,
    /// Zeiler & Fergus' deconvnet: rectify the signal itself.
    Deconv,
    /// Guided backpropagation: both.
    Guided,
}

/// A projection to pixel space, `[C, H, W]` values, and whether the requested rule was used
/// (false: the model branches, the plain gradient was computed instead).
pub struct Projection {
    pub values: Vec<f32>,
    pub exact_rule: bool,
}

/// Projects one activation of layer `layer` back to the input: the strongest activation of
/// `channel` (default: the channel with the strongest activation), all others zeroed, as the
/// deconvnet does. Returns the projection and the channel used.
pub fn project_activation(
    model: &Model,
    x: Tensor<4>,
    layer: &str,
    channel: Option<usize>,
    rule: ReluRule,
) -> Result<(Projection, usize)> {
    let maps = model.feature_maps(x.clone(), &[layer.to_string()])?;
    let a = maps[0].1.clone().inner();
    let [_, c, h, w] = a.dims();
    let values = super::host(Tensor::<4>::from_inner(a));
    let ch = match channel {
        Some(k) => {
            super::check_channel(layer, k, c)?;
            k
        }
        None => (0..c)
            .max_by(|&i, &j| {
                let m = |k: usize| {
                    values[k * h * w..(k + 1) * h * w]
                        .iter()
                        .copied()
                        .fold(f32::MIN, f32::max)
                };
                m(i).total_cmp(&m(j))
            })
            .unwrap_or(0),
    };
    // The signal: only the strongest activation of the channel, at its value.
    let plane = &values[ch * h * w..(ch + 1) * h * w];
    let (pos, &v) = plane
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .expect("non-empty map");
    let mut sig = vec![0f32; c * h * w];
    sig[ch * h * w + pos] = v.max(1e-6);
    let device = x.device();
    let g = Tensor::<4>::from_data(TensorData::new(sig, [1, c, h, w]), &device);
    let projection = match sequential(model) {
        Some(ops) => backward_through(&ops, x, layer, g, rule)?,
        None => Projection {
            values: gradient_of(model, x, layer, g)?,
            exact_rule: rule == ReluRule::Gradient,
        },
    };
    Ok((projection, ch))
}

/// Runs `ops` forward to the tap `layer`, recording each op's input, then carries `g` back.
fn backward_through(
    ops: &[Op],
    x: Tensor<4>,
    layer: &str,
    g: Tensor<4>,
    rule: ReluRule,
) -> Result<Projection> {
    let mut inputs = Vec::new();
    let mut cur = x.detach();
    let mut end = None;
    for (i, op) in ops.iter().enumerate() {
        if let Op::Tap(name) = op
            && name == layer
        {
            end = Some(i);
            break;
        }
        inputs.push(cur.clone());
        cur = op.forward(cur).detach();
    }
    let end = end.ok_or_else(|| Error::Invalid(format!("unknown layer `{layer}`")))?;
    let mut sig = g.detach();
    for i in (0..end).rev() {
        let x_in = &inputs[i];
        sig = match (&ops[i], rule) {
            (Op::Tap(_), _) => sig,
            (Op::Relu, ReluRule::Gradient) => sig * x_in.clone().greater_elem(0.0).float(),
            (Op::Relu, ReluRule::Deconv) => relu(sig),
            (Op::Relu, ReluRule::Guided) => relu(sig) * x_in.clone().greater_elem(0.0).float(),
            (op, _) => vjp(op, x_in, sig),
        };
    }
    Ok(Projection {
        values: super::host(sig),
        exact_rule: true,
    })
}

/// `d <layer(x), g> / dx` by autodiff through the whole model, probing `layer` with a zero
/// tensor so its gradient equals the signal's.
fn gradient_of(model: &Model, x: Tensor<4>, layer: &str, g: Tensor<4>) -> Result<Vec<f32>> {
    let x = x.detach().require_grad();
    let mut at = None;
    let _ = model.features_tapped(x.clone(), &mut |name, t| {
        if name == layer {
            at = Some(t.clone());
        }
        t
    });
    let a = at.ok_or_else(|| Error::Invalid(format!("unknown layer `{layer}`")))?;
    let grads = (a * g.detach()).sum().backward();
    Ok(super::host(Tensor::<4>::from_inner(
        x.grad(&grads).expect("input requires grad"),
    )))
}

/// Gradient of the class score (logit) `class` w.r.t. the input (`[C, H, W]`), or with
/// `guided` guided backpropagation (sequential models; otherwise the gradient, flagged).
pub fn saliency(model: &Model, x: Tensor<4>, class: usize, guided: bool) -> Result<Projection> {
    let k = model.num_classes();
    if class >= k {
        return Err(Error::Invalid(format!(
            "class {class} does not exist (the model has classes 0..{})",
            k - 1
        )));
    }
    let device = x.device();
    let mut onehot = vec![0f32; k];
    onehot[class] = 1.0;
    let g = Tensor::<2>::from_data(TensorData::new(onehot, [1, k]), &device);
    if guided && let Some(ops) = sequential(model) {
        // Through the head by autodiff (its ReLUs follow the gradient rule), then guided
        // through the convolutional part.
        let last = ops
            .iter()
            .rev()
            .find_map(|o| match o {
                Op::Tap(n) => Some(n.clone()),
                _ => None,
            })
            .expect("a tap");
        let f = model.forward_features(x.clone()).detach().require_grad();
        let grads = (model.forward_head(f.clone()) * g).sum().backward();
        let gf = Tensor::<4>::from_inner(f.grad(&grads).expect("probe"));
        return backward_through(&ops, x, &last, gf, ReluRule::Guided);
    }
    let x = x.detach().require_grad();
    let grads = (model.forward(x.clone()) * g).sum().backward();
    Ok(Projection {
        values: super::host(Tensor::<4>::from_inner(
            x.grad(&grads).expect("input requires grad"),
        )),
        exact_rule: !guided,
    })
}

/// Grad-CAM at `layer`: `relu(sum_c mean_hw(dy_class / dA_c) * A_c)`, an `h x w` map.
pub fn grad_cam(
    model: &Model,
    x: Tensor<4>,
    layer: &str,
    class: usize,
) -> Result<(Vec<f32>, usize, usize)> {
    // An unknown layer: the error lists the valid ones.
    model.feature_maps(x.clone().detach(), &[layer.to_string()])?;
    let mut probe = None;
    let mut act = None;
    let logits = model.forward_tapped(x.detach(), &mut |name, t| {
        if name == layer {
            let z = t.zeros_like().detach().require_grad();
            probe = Some(z.clone());
            act = Some(t.clone().inner());
            t + z
        } else {
            t
        }
    });
    let (Some(z), Some(a)) = (probe, act) else {
        return Err(Error::Invalid(format!("unknown layer `{layer}`")));
    };
    let k = logits.dims()[1];
    if class >= k {
        return Err(Error::Invalid(format!(
            "class {class} does not exist (the model has classes 0..{})",
            k - 1
        )));
    }
    let score = logits.slice([0..1, class..class + 1]).sum();
    let grads = score.backward();
    let gz = z.grad(&grads).expect("probe requires grad");
    let [_, _, h, w] = a.dims();
    let weights = gz.mean_dim(3).mean_dim(2); // [1, C, 1, 1]
    let cam = Tensor::<4>::from_inner((a * weights).sum_dim(1)); // [1, 1, h, w]
    Ok((super::host(relu(cam)), w, h))
}

/// The occlusion experiment: a grey (dataset-mean) `patch x patch` square slid with `stride`
/// over the input; for each position the probability of `class` and the most probable class.
/// Returns `(probabilities, argmax classes, columns, rows)`.
pub fn occlusion(
    model: &Model,
    x: Tensor<4>,
    class: usize,
    patch: usize,
    stride: usize,
) -> Result<(Vec<f32>, Vec<usize>, usize, usize)> {
    let [_, c, h, w] = x.dims();
    if patch == 0 || stride == 0 || patch > h.min(w) {
        return Err(Error::Invalid(format!(
            "--patch must be in 1..={} and --stride >= 1",
            h.min(w)
        )));
    }
    let k = model.num_classes();
    if class >= k {
        return Err(Error::Invalid(format!(
            "class {class} does not exist (0..{})",
            k - 1
        )));
    }
    let base = super::host(x.clone());
    let device = x.device().without_autodiff();
    let eval = model.valid();
    let (nx, ny) = ((w - patch) / stride + 1, (h - patch) / stride + 1);
    let positions: Vec<(usize, usize)> = (0..ny)
        .flat_map(|j| (0..nx).map(move |i| (i * stride, j * stride)))
        .collect();
    let mut probs = Vec::new();
    let mut classes = Vec::new();
    for chunk in positions.chunks(64) {
        let mut buf = Vec::with_capacity(chunk.len() * base.len());
        for &(x0, y0) in chunk {
            let mut img = base.clone();
            for ch in 0..c {
                for y in y0..y0 + patch {
                    // 0 after normalisation = the training mean: a grey square.
                    img[ch * h * w + y * w + x0..ch * h * w + y * w + x0 + patch].fill(0.0);
                }
            }
            buf.extend(img);
        }
        let batch = Tensor::<4>::from_data(TensorData::new(buf, [chunk.len(), c, h, w]), &device);
        let p = super::host(softmax(eval.forward(batch), 1));
        for row in p.chunks_exact(k) {
            probs.push(row[class]);
            classes.push(crate::eval::metrics::argmax(row));
        }
    }
    Ok((probs, classes, nx, ny))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::convnet::ConvNetConfig;
    use burn::module::{Module, Param};

    /// A 1-channel net with known weights: conv1 = identity 3x3 kernel (centre 1), no bias, no
    /// BN, ReLU, global average pool, linear to 2 classes with weights (+1, -1), no bias. So
    /// logit_0 = mean(relu(x)) = -logit_1.
    fn tiny(device: &Device) -> Model {
        let mut m = ConvNetConfig::new("1".into(), 2)
            .with_in_channels(1)
            .with_batch_norm(false)
            .init(device);
        let mut k = vec![0f32; 9];
        k[4] = 1.0;
        m.trunk.convs[0].conv.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(k, [1, 1, 3, 3]), device));
        m.trunk.convs[0].conv.bias = None;
        m.fc.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![1f32, -1.0], [1, 2]),
            device,
        ));
        m.fc.bias = None;
        Model::ConvNet(m).freeze()
    }

    fn image(values: Vec<f32>, s: usize, device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(values, [1, 1, s, s]), device)
    }

    #[test]
    fn deconv_of_an_identity_net_is_the_strongest_pixel() {
        let dev = Device::flex().autodiff();
        let model = tiny(&dev);
        // 4x4 input with its largest value at (2, 1) and some negatives.
        let v = vec![
            0.1, -0.5, 0.2, 0.0, //
            0.3, 0.4, -0.2, 0.1, //
            0.0, 0.9, 0.5, -0.3, //
            0.2, 0.0, 0.1, 0.6,
        ];
        let (p, ch) =
            project_activation(&model, image(v, 4, &dev), "conv1", None, ReluRule::Deconv).unwrap();
        assert!(p.exact_rule);
        assert_eq!(ch, 0);
        let mut want = vec![0f32; 16];
        want[2 * 4 + 1] = 0.9;
        for (a, b) in p.values.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{:?}", p.values);
        }
    }

    #[test]
    fn saliency_of_an_identity_net_is_the_relu_mask_over_pixels() {
        let dev = Device::flex().autodiff();
        let model = tiny(&dev);
        let v: Vec<f32> = (0..9)
            .map(|i| if i % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        let g = saliency(&model, image(v.clone(), 3, &dev), 0, false).unwrap();
        // d mean(relu(x)) / dx_p = [x_p > 0] / 9.
        for (gi, xi) in g.values.iter().zip(&v) {
            let want = if *xi > 0.0 { 1.0 / 9.0 } else { 0.0 };
            assert!((gi - want).abs() < 1e-6, "{:?}", g.values);
        }
        // For class 1 the sign flips; guided backprop keeps only positive signal: all zero.
        let g1 = saliency(&model, image(v.clone(), 3, &dev), 1, false).unwrap();
        assert!((g1.values[0] + 1.0 / 9.0).abs() < 1e-6);
        let guided = saliency(&model, image(v, 3, &dev), 1, true).unwrap();
        assert!(guided.exact_rule);
        assert!(
            guided.values.iter().all(|&x| x == 0.0),
            "{:?}",
            guided.values
        );
    }

    #[test]
    fn occluding_the_decisive_region_lowers_the_class_probability() {
        let dev = Device::flex().autodiff();
        let model = tiny(&dev);
        // 8x8 image, bright 2x2 square in the top-left corner, zero elsewhere: class 0's
        // evidence is all in that corner.
        let mut v = vec![0f32; 64];
        for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            v[y * 8 + x] = 4.0;
        }
        let (probs, classes, nx, ny) = occlusion(&model, image(v, 8, &dev), 0, 2, 2).unwrap();
        assert_eq!((nx, ny), (4, 4));
        assert_eq!(probs.len(), 16);
        // Covering the square: logit 0, p = 0.5; anywhere else p = sigmoid(2 * 16 / 64).
        assert!((probs[0] - 0.5).abs() < 1e-5, "{probs:?}");
        let rest = 1.0 / (1.0 + (-2.0f32 * 0.25).exp());
        assert!(
            probs[1..].iter().all(|p| (p - rest).abs() < 1e-5),
            "{probs:?}"
        );
        assert!(probs[0] < probs[15]);
        assert!(classes.iter().all(|&c| c == 0));
    }

    #[test]
    fn grad_cam_points_at_the_evidence() {
        let dev = Device::flex().autodiff();
        let model = tiny(&dev);
        let mut v = vec![0f32; 16];
        v[5] = 1.0;
        v[10] = 0.5;
        let (cam, w, h) = grad_cam(&model, image(v, 4, &dev), "conv1", 0).unwrap();
        assert_eq!((w, h), (4, 4));
        // weights = 1/16 for the one channel: cam = relu(x) / 16.
        assert!((cam[5] - 1.0 / 16.0).abs() < 1e-6 && (cam[10] - 0.5 / 16.0).abs() < 1e-6);
        assert_eq!(cam.iter().filter(|&&c| c > 0.0).count(), 2);
        let e = grad_cam(&model, image(vec![0.0; 16], 4, &dev), "conv9", 0).unwrap_err();
        assert!(e.to_string().contains("valid layers: conv1"), "{e}");
    }
}
