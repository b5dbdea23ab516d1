//! The model zoo: one file per family, one [`Model`] type that dispatches to them, and the
//! registry [`ModelName`], a serialisable enum (no global state).
//!
//! Every model offers the same interface: [`Model::forward_features`] (the last feature map),
//! [`Model::forward_head`] (features to logits), [`Model::forward`], [`Model::feature_maps`]
//! (named intermediate maps, for visualisation and per-layer analysis), [`Model::num_classes`]
//! and [`Model::with_classes`] (a fresh head, for fine-tuning).

pub mod convnet;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layers::PoolKind;
use convnet::{ConvNet, ConvNetConfig, Plan, parse_plan};

/// Every registered model, by its command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelName {
    /// Default: 4 conv3x3-BN-ReLU (32-M-64-M-128-128), GAP, linear. For 28-32 px input.
    #[serde(rename = "convnet_small")]
    ConvnetSmall,
    /// The peer-comparison VGG: 64-64-M-128-128-M-256-256-M, BN, GAP, linear; 32x32 RGB.
    #[serde(rename = "bench-vgg")]
    BenchVgg,
}

impl ModelName {
    /// All registered names, in listing order.
    pub const ALL: &'static [ModelName] = &[ModelName::ConvnetSmall, ModelName::BenchVgg];

    /// The command-line name.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelName::ConvnetSmall => "convnet_small",
            ModelName::BenchVgg => "bench-vgg",
        }
    }

    /// Looks a name up; an unknown one is an error listing the known names.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == name)
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                known: Self::ALL
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The family this model belongs to.
    pub fn family(self) -> &'static str {
        match self {
            ModelName::ConvnetSmall | ModelName::BenchVgg => "convnet",
        }
    }

    /// Input side the model is designed for.
    pub fn default_input_size(self) -> usize {
        match self {
            ModelName::ConvnetSmall => 28,
            ModelName::BenchVgg => 32,
        }
    }

    /// The default layer plan of a `convnet`-family model.
    pub fn plan(self) -> &'static str {
        match self {
            ModelName::ConvnetSmall => "32,M,64,M,128,128",
            ModelName::BenchVgg => "64,64,M,128,128,M,256,256,M",
        }
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The recipe's `[model]` section: a registered name plus the options every family takes.
/// Zero in `num_classes`, `in_channels` or `input_size` means "take it from the data"; the
/// resolved recipe in a run folder always holds the concrete values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub name: ModelName,
    pub num_classes: usize,
    /// 1 (grey) or 3 (RGB); images are converted to this.
    pub in_channels: usize,
    /// Side of the square input in pixels.
    pub input_size: usize,
    /// `max` or `avg` pooling.
    pub pool: PoolKind,
    /// Overlapping 3x3 stride-2 pooling (AlexNet) instead of plain 2x2 stride 2.
    pub overlapping_pool: bool,
    /// Dropout probability before the classifier.
    pub dropout: f64,
    /// Batch norm after every convolution.
    pub batch_norm: bool,
    /// Layer plan of the `convnet` family in VGG notation (`"32,M,64,64,M,128"`: numbers are
    /// 3x3 conv widths, `M` a pool); absent = the model's own. Ablations remove or widen
    /// layers through it.
    pub plan: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: ModelName::ConvnetSmall,
            num_classes: 0,
            in_channels: 0,
            input_size: 0,
            pool: PoolKind::Max,
            overlapping_pool: false,
            dropout: 0.0,
            batch_norm: true,
            plan: None,
        }
    }
}

impl ModelConfig {
    /// The default configuration of a registered model, by name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(ModelConfig {
            name: ModelName::from_name(name)?,
            ..Default::default()
        })
    }

    /// The layer plan in effect.
    pub fn plan(&self) -> &str {
        self.plan.as_deref().unwrap_or(self.name.plan())
    }

    /// Checks the values make a buildable model.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Error::Recipe {
            origin: "resolved".into(),
            key: format!("model.{key}"),
            reason,
        };
        if self.num_classes < 2 {
            return Err(bad(
                "num_classes",
                format!("{} (need at least 2)", self.num_classes),
            ));
        }
        if ![1, 3].contains(&self.in_channels) {
            return Err(bad(
                "in_channels",
                format!("{} (must be 1 or 3)", self.in_channels),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad(
                "dropout",
                format!("{} (must be in [0, 1))", self.dropout),
            ));
        }
        let pools = parse_plan(self.plan())
            .map_err(|e| bad("plan", e))?
            .iter()
            .filter(|p| **p == Plan::Pool)
            .count();
        if self.input_size < (1 << pools) {
            return Err(bad(
                "input_size",
                format!(
                    "{} is too small for {} pooling stages",
                    self.input_size, pools
                ),
            ));
        }
        Ok(())
    }

    /// Builds the model with freshly initialised weights on `device`.
    pub fn build(&self, device: &Device) -> Result<Model> {
        self.validate()?;
        let cfg = ConvNetConfig::new(self.plan().to_string(), self.num_classes)
            .with_in_channels(self.in_channels)
            .with_batch_norm(self.batch_norm)
            .with_pool(self.pool)
            .with_pool_kernel(if self.overlapping_pool { 3 } else { 2 })
            .with_dropout(self.dropout);
        Ok(Model::ConvNet(cfg.init(device)))
    }

    /// Multiply-adds x 2 of one forward pass at the configured input size, from layer shapes.
    pub fn flops(&self) -> f64 {
        let plan = parse_plan(self.plan()).unwrap_or_default();
        let (mut c, mut s, mut flops) = (self.in_channels.max(1), self.input_size, 0f64);
        for p in plan {
            match p {
                Plan::Conv(w) => {
                    flops += 2.0 * (c * w * 9 * s * s) as f64;
                    c = w;
                }
                Plan::Pool => s /= 2,
            }
        }
        flops + 2.0 * (c * self.num_classes.max(1)) as f64
    }
}

/// Learnable parameters of a module, as PyTorch's `sum(p.numel() for p in m.parameters())`:
/// batch-norm running statistics are buffers, not parameters, and are not counted.
pub fn param_count<M: Module>(module: &M) -> usize {
    struct Count {
        path: Vec<String>,
        n: usize,
    }
    impl burn::module::ModuleVisitor for Count {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<D>>) {
            let last = self.path.last().map(String::as_str).unwrap_or("");
            if last != "running_mean" && last != "running_var" {
                self.n += p.lazy_shape().num_elements();
            }
        }
    }
    let mut c = Count {
        path: Vec::new(),
        n: 0,
    };
    module.visit(&mut c);
    c.n
}

/// Any registered model.
#[derive(Module, Debug)]
pub enum Model {
    ConvNet(ConvNet),
}

impl Model {
    /// The last feature map.
    ///
    /// # Shapes
    /// `[B, C, H, W]` -> `[B, C', h, w]`.
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Model::ConvNet(m) => m.trunk(x, &mut |_, _| {}),
        }
    }

    /// Features to logits.
    ///
    /// # Shapes
    /// `[B, C', h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        match self {
            Model::ConvNet(m) => m.forward_head(f),
        }
    }

    /// Images to logits.
    ///
    /// # Shapes
    /// `[B, C, H, W]` -> `[B, K]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_head(self.forward_features(x))
    }

    /// The named intermediate feature maps, in network order (all of them when `names` is
    /// empty). An unknown name is an error listing the valid ones.
    pub fn feature_maps(&self, x: Tensor<4>, names: &[String]) -> Result<Vec<(String, Tensor<4>)>> {
        let mut all = Vec::new();
        match self {
            Model::ConvNet(m) => {
                m.trunk(x, &mut |n, t| all.push((n, t.clone())));
            }
        }
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

    pub fn num_classes(&self) -> usize {
        match self {
            Model::ConvNet(m) => m.num_classes(),
        }
    }

    /// The same model with a fresh `n`-way classifier.
    pub fn with_classes(self, n: usize, device: &Device) -> Self {
        match self {
            Model::ConvNet(m) => Model::ConvNet(m.with_classes(n, device)),
        }
    }
}
