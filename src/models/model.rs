//! [`Model`]: any registered model behind one interface.

use burn::prelude::*;

use super::alexnet::AlexNet;
use super::convnet::ConvNet;
use super::googlenet::GoogLeNet;
use super::resnet::ResNet;
use super::vgg::Vgg;
use crate::error::{Error, Result};

/// Any registered model.
// One model exists per run, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Model {
    AlexNet(AlexNet),
    ConvNet(ConvNet),
    Vgg(Vgg),
    GoogLeNet(GoogLeNet),
    ResNet(ResNet),
}

/// What a training step needs from a forward pass: the logits, and the auxiliary
/// classifiers' logits where the model has them (GoogLeNet).
pub struct TrainOutput {
    pub logits: Tensor<2>,
    pub aux: Vec<Tensor<2>>,
}

impl Model {
    /// Runs the feature extractor, passing every named intermediate map through `tap`, in
    /// f32 (a model running bf16 end to end keeps its maps in bf16, [`crate::layers::activations`];
    /// the tap sees them widened, and what it returns goes on in the model's dtype).
    pub fn features_tapped(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        self.features_raw(x, &mut |name, t| {
            let dtype = t.dtype();
            let t = tap(name, crate::layers::f32_activations(t));
            if t.dtype() == dtype { t } else { t.cast(dtype) }
        })
    }

    /// [`Self::features_tapped`] with the maps in the model's own dtype.
    fn features_raw(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        match self {
            Model::AlexNet(m) => m.features(x, tap),
            Model::ConvNet(m) => m.features(x, tap),
            Model::Vgg(m) => m.features(x, tap),
            Model::GoogLeNet(m) => m.features(x, tap),
            Model::ResNet(m) => m.features(x, tap),
        }
    }

    /// The last feature map.
    ///
    /// # Shapes
    /// `[B, C, H, W]` -> `[B, C', h, w]`.
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        self.features_raw(x, &mut |_, x| x)
    }

    /// Features to logits.
    ///
    /// # Shapes
    /// `[B, C', h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        match self {
            Model::AlexNet(m) => m.forward_head(f),
            Model::ConvNet(m) => m.forward_head(f),
            Model::Vgg(m) => m.forward_head(f),
            Model::GoogLeNet(m) => m.forward_head(f),
            Model::ResNet(m) => m.forward_head(f),
        }
    }

    /// Images to logits, passing every named intermediate map through `tap`.
    pub fn forward_tapped(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<2> {
        self.forward_head(self.features_tapped(x, tap))
    }

    /// Images to logits.
    ///
    /// # Shapes
    /// `[B, C, H, W]` -> `[B, K]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_head(self.forward_features(x))
    }

    /// The training forward pass: logits plus auxiliary logits (GoogLeNet's two heads; none
    /// for the other families). Evaluation uses [`Self::forward`], which never runs them.
    pub fn forward_train(&self, x: Tensor<4>) -> TrainOutput {
        match self {
            Model::GoogLeNet(m) => {
                let (logits, aux) = m.forward_aux(x);
                TrainOutput { logits, aux }
            }
            _ => TrainOutput {
                logits: self.forward(x),
                aux: Vec::new(),
            },
        }
    }

    /// The named intermediate feature maps, in network order (all of them when `names` is
    /// empty). An unknown name is an error listing the valid ones.
    pub fn feature_maps(&self, x: Tensor<4>, names: &[String]) -> Result<Vec<(String, Tensor<4>)>> {
        let mut all = Vec::new();
        self.features_tapped(x, &mut |n, t| {
            all.push((n, t.clone()));
            t
        });
        if let Some(bad) = names.iter().find(|n| !all.iter().any(|(a, _)| a == *n)) {
            let valid: Vec<&str> = all.iter().map(|(a, _)| a.as_str()).collect();
            return Err(Error::Invalid(format!(
                "unknown layer `{bad}`; valid layers: {}",
                valid.join(", ")
            )));
        }
        if !names.is_empty() {
            all.retain(|(a, _)| names.contains(a));
        }
        Ok(all)
    }

    /// The inference graph in ONNX (opset [`crate::onnx::OPSET`]) for `[batch, c, h, w]`
    /// input, `batch` dynamic. The spatial size is fixed because AlexNet's and VGG's adaptive
    /// pool depends on it; the graph is traced by each family's `onnx`, beside its `forward`.
    pub fn to_onnx(
        &self,
        input_chw: [usize; 3],
        metadata: &[(&str, String)],
    ) -> crate::onnx::OnnxModel {
        let mut g = crate::onnx::Graph::new(input_chw);
        let out = self.onnx(&mut g);
        g.finish(&out, input_chw, self.num_classes(), metadata)
    }

    /// The shape trace of one forward pass at `input_chw`: every convolution's geometry
    /// ([`crate::onnx::Graph::convs`]) and the FLOPs ([`crate::onnx::Graph::flops`]), from
    /// the built model's own layers and without touching (or initialising) a weight.
    pub fn trace(&self, input_chw: [usize; 3]) -> crate::onnx::Graph {
        let mut g = crate::onnx::Graph::shapes_only(input_chw);
        self.onnx(&mut g);
        g
    }

    fn onnx(&self, g: &mut crate::onnx::Graph) -> String {
        let x = crate::onnx::INPUT;
        match self {
            Model::AlexNet(m) => m.onnx(g, x),
            Model::ConvNet(m) => m.onnx(g, x),
            Model::Vgg(m) => m.onnx(g, x),
            Model::GoogLeNet(m) => m.onnx(g, x),
            Model::ResNet(m) => m.onnx(g, x),
        }
    }

    /// The same model with its convolutions computing in `precision` (fp32 as built). The
    /// choice travels with the model, so every forward pass of it (training, evaluation, TTA,
    /// visualisations) and every thread that runs one computes the same way; the backward pass
    /// follows its forward pass. A precision the device or CPU cannot run falls back to fp32
    /// ([`crate::kernels::supported_precision`] says why, for the caller to print).
    pub fn with_precision(mut self, precision: crate::layers::Precision) -> Self {
        match &mut self {
            Model::AlexNet(m) => m.precision = precision,
            Model::ConvNet(m) => m.precision = precision,
            Model::Vgg(m) => m.precision = precision,
            Model::GoogLeNet(m) => m.precision = precision,
            Model::ResNet(m) => m.precision = precision,
        }
        self
    }

    /// The precision set by [`Self::with_precision`].
    pub fn precision(&self) -> crate::layers::Precision {
        match self {
            Model::AlexNet(m) => m.precision,
            Model::ConvNet(m) => m.precision,
            Model::Vgg(m) => m.precision,
            Model::GoogLeNet(m) => m.precision,
            Model::ResNet(m) => m.precision,
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Model::AlexNet(m) => m.num_classes(),
            Model::ConvNet(m) => m.num_classes(),
            Model::Vgg(m) => m.num_classes(),
            Model::GoogLeNet(m) => m.num_classes(),
            Model::ResNet(m) => m.num_classes(),
        }
    }

    /// The same model with a fresh `n`-way classifier.
    pub fn with_classes(self, n: usize, device: &Device) -> Self {
        match self {
            Model::AlexNet(m) => Model::AlexNet(m.with_classes(n, device)),
            Model::ConvNet(m) => Model::ConvNet(m.with_classes(n, device)),
            Model::Vgg(m) => Model::Vgg(m.with_classes(n, device)),
            Model::GoogLeNet(m) => Model::GoogLeNet(m.with_classes(n, device)),
            Model::ResNet(m) => Model::ResNet(m.with_classes(n, device)),
        }
    }
}

/// Learnable parameters of a module, as PyTorch's `sum(p.numel() for p in m.parameters())`:
/// batch-norm running statistics are buffers, not parameters, and are not counted; nor are
/// training-only auxiliary classifiers (GoogLeNet's `aux`), as torchvision counts GoogLeNet
/// with `aux_logits=False`.
pub fn param_count<M: Module>(module: &M) -> usize {
    let mut n = 0;
    crate::params::for_each_shape(module, |site, shape| {
        if site.role().is_parameter() && !site.inside("AuxHead") {
            n += shape.iter().product::<usize>();
        }
    });
    n
}
