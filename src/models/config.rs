//! The recipe's `[model]` section and how it becomes a model of each family.

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use super::alexnet::AlexNetConfig;
use super::convnet::ConvNetConfig;
use super::googlenet::GoogLeNetConfig;
use super::init::{self, Init};
use super::resnet::ResNetConfig;
use super::vgg::VggConfig;
use super::{Family, Model, ModelName};
use crate::error::{Error, Result};
use crate::layers::PoolKind;
use crate::layers::trunk::{Plan, parse_plan};

/// The recipe's `[model]` section: a registered name plus the options every family takes.
/// Zero in `num_classes`, `in_channels` or `input_size` means "take it from the data"; absent
/// options mean "the model's own". The resolved recipe in a run folder holds concrete values
/// for the first three.
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
    /// Overlapping 3x3 stride-2 pooling (AlexNet) instead of plain 2x2 stride 2 (absent:
    /// the model's own: overlapping for AlexNet and ZFNet, plain for the others).
    pub overlapping_pool: Option<bool>,
    /// Dropout probability in the classifier (absent: the model's own, 0.5 for VGG).
    pub dropout: Option<f64>,
    /// Batch norm after every convolution (absent: the model's own).
    pub batch_norm: Option<bool>,
    /// Local response normalisation (absent: the model's own).
    pub lrn: Option<bool>,
    /// Layer plan of plain models in VGG notation (`"32,M,64,64,M,128"`: 3x3 conv widths,
    /// `Nk1` a 1x1 conv, `M` a pool); absent = the model's own. Ablations remove or widen
    /// layers through it.
    pub plan: Option<String>,
    /// ResNet: start every residual block as the identity (last BN scale 0).
    pub zero_gamma: bool,
    /// Weight initialisation: `default`, `xavier`, `kaiming` or `paper` (absent: the model's
    /// own, which is `paper` for `alexnet_paper` and `default` for the others).
    pub init: Option<Init>,
    /// AlexNet/ZFNet: width of the two hidden FC layers; 0 removes them (ZFNet's ablation,
    /// section 5.1). Absent: the model's own (4096; 512 for the small variants).
    pub hidden: Option<usize>,
    /// AlexNet/ZFNet: output channels of each conv, replacing the model's own (same count).
    pub conv_widths: Option<Vec<usize>>,
    /// AlexNet/ZFNet: convs to remove, by layer number (`[3, 4]` = conv3 and conv4); a removed
    /// conv's pooling moves to the conv before it.
    pub remove_convs: Option<Vec<usize>>,
    /// Start from these weights: a PyTorch `.pth`/`.pt` or `.safetensors` state dict
    /// (torchvision, timm or convlab naming, detected from the keys) or another run folder
    /// (its best checkpoint). A classifier of another class count is re-initialised; every
    /// other tensor must load.
    pub pretrained: Option<std::path::PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: ModelName::ConvnetSmall,
            num_classes: 0,
            in_channels: 0,
            input_size: 0,
            pool: PoolKind::Max,
            overlapping_pool: None,
            dropout: None,
            batch_norm: None,
            lrn: None,
            plan: None,
            zero_gamma: false,
            init: None,
            hidden: None,
            conv_widths: None,
            remove_convs: None,
            pretrained: None,
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

    /// A fully specified config for `name` with `classes` outputs at its default input size.
    pub fn for_model(name: ModelName, classes: usize, in_channels: usize) -> Self {
        ModelConfig {
            name,
            num_classes: classes,
            in_channels,
            input_size: name.default_input_size(),
            ..Default::default()
        }
    }

    /// The layer plan in effect.
    pub fn plan(&self) -> &str {
        self.plan.as_deref().unwrap_or(self.name.plan())
    }

    /// Checks the options that do not depend on the data (run before anything is written).
    pub fn validate_options(&self) -> Result<()> {
        let c = ModelConfig {
            num_classes: 2,
            in_channels: 3,
            // A size the recipe sets is checked now, before any folder is made.
            input_size: if self.input_size == 0 {
                crate::limits::MAX_IMAGE_SIDE
            } else {
                self.input_size
            },
            ..self.clone()
        };
        c.validate()
    }

    /// Checks the values make a buildable model.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Error::Recipe {
            origin: String::new(),
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
        if let Some(d) = self.dropout
            && !(0.0..1.0).contains(&d)
        {
            return Err(bad("dropout", format!("{d} (must be in [0, 1))")));
        }
        // Each family declares the options it takes (`OPTIONS` in its file); anything else
        // set is an error naming the key, not a silently ignored setting.
        let family = self.name.family();
        let takes = family.options();
        type Takes = fn(&super::Options) -> bool;
        let rules: [(&str, &str, bool, Takes); 9] = [
            ("hidden", "`hidden`", self.hidden.is_some(), |o| {
                o.alexnet_shape
            }),
            (
                "conv_widths",
                "`conv_widths`",
                self.conv_widths.is_some(),
                |o| o.alexnet_shape,
            ),
            (
                "remove_convs",
                "`remove_convs`",
                self.remove_convs.is_some(),
                |o| o.alexnet_shape,
            ),
            ("plan", "`plan`", self.plan.is_some(), |o| o.plan),
            (
                "batch_norm",
                "batch_norm = false",
                self.batch_norm == Some(false),
                |o| !o.batch_norm_required,
            ),
            ("lrn", "LRN layers", self.lrn == Some(true), |o| o.lrn),
            ("zero_gamma", "`zero_gamma`", self.zero_gamma, |o| {
                o.zero_gamma
            }),
            (
                "pool",
                "pool and overlapping_pool",
                self.pool != PoolKind::Max || self.overlapping_pool.is_some(),
                |o| o.pooling,
            ),
            (
                "init",
                "init = \"paper\"",
                self.init == Some(Init::Paper),
                |o| o.paper_init,
            ),
        ];
        if let Some((key, what, _, allows)) = rules.iter().find(|r| r.2 && !(r.3)(&takes)) {
            let who: Vec<&str> = Family::ALL
                .iter()
                .filter(|f| allows(&f.options()))
                .map(|f| f.as_str())
                .collect();
            return Err(bad(
                key,
                format!(
                    "{} ({}) does not take {what}: only the {} families do",
                    self.name,
                    family.as_str(),
                    who.join(", ")
                ),
            ));
        }
        let pools = match family {
            Family::AlexNet | Family::ZfNet => {
                super::alexnet::layers(self).map_err(|(k, e)| bad(k, e))?;
                if self.name.is_small() { 4 } else { 6 }
            }
            Family::ConvNet | Family::Vgg => parse_plan(self.plan())
                .map_err(|e| bad("plan", e))?
                .iter()
                .filter(|p| **p == Plan::Pool)
                .count(),
            Family::GoogLeNet | Family::ResNet => {
                if self.name.is_small() {
                    3
                } else {
                    5
                }
            }
        };
        if self.num_classes > crate::limits::MAX_CLASSES {
            return Err(bad(
                "num_classes",
                format!(
                    "{} (at most {})",
                    self.num_classes,
                    crate::limits::MAX_CLASSES
                ),
            ));
        }
        if self.input_size > crate::limits::MAX_IMAGE_SIDE {
            return Err(bad(
                "input_size",
                format!(
                    "{} px (at most {})",
                    self.input_size,
                    crate::limits::MAX_IMAGE_SIDE
                ),
            ));
        }
        self.check_sizes().map_err(|(k, e)| bad(k, e))?;
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

    /// Widths, depth and parameter count within [`crate::limits`], checked before a model is
    /// built so a typo like `plan = "99999999999"` is an error, not an allocation abort. The
    /// count is an upper estimate over the convs and FC layers a user can resize.
    fn check_sizes(&self) -> std::result::Result<(), (&'static str, String)> {
        use crate::limits::{MAX_PARAMS, MAX_PLAN_LAYERS, MAX_WIDTH};
        let wide = |key: &'static str, n: usize| {
            if n > MAX_WIDTH {
                Err((
                    key,
                    format!("a width of {n} channels (at most {MAX_WIDTH})"),
                ))
            } else {
                Ok(())
            }
        };
        let k = self.num_classes as f64;
        let mut c = self.in_channels as f64;
        let mut params = 0.0;
        match self.name.family() {
            Family::ConvNet | Family::Vgg => {
                let plan = parse_plan(self.plan()).map_err(|e| ("plan", e))?;
                if plan.len() > MAX_PLAN_LAYERS {
                    return Err((
                        "plan",
                        format!("{} layers (at most {MAX_PLAN_LAYERS})", plan.len()),
                    ));
                }
                for p in &plan {
                    let (n, ks) = match *p {
                        Plan::Conv(n) => (n, 3),
                        Plan::ConvK(n, ks) => (n, ks),
                        Plan::Pool => continue,
                    };
                    wide("plan", n)?;
                    if ks > 31 {
                        return Err(("plan", format!("a {ks}x{ks} kernel (at most 31)")));
                    }
                    params += c * n as f64 * (ks * ks) as f64;
                    c = n as f64;
                }
                params += if self.name.family() == Family::Vgg {
                    let h = 4096.0;
                    c * 49.0 * h + h * h + h * k
                } else {
                    c * k
                };
            }
            Family::AlexNet | Family::ZfNet => {
                if let Some(h) = self.hidden {
                    wide("hidden", h)?;
                }
                for &w in self.conv_widths.iter().flatten() {
                    wide("conv_widths", w)?;
                }
                let (convs, _, _) = super::alexnet::layers(self)?;
                for [n, ks, _, _, g] in convs {
                    params += c * n as f64 * (ks * ks) as f64 / g.max(1) as f64;
                    c = n as f64;
                }
                let h = self.hidden.unwrap_or(4096) as f64;
                params += c * 36.0 * h + h * h + h.max(c * 36.0) * k;
            }
            Family::GoogLeNet | Family::ResNet => {}
        }
        if params > MAX_PARAMS {
            return Err((
                if matches!(self.name.family(), Family::ConvNet | Family::Vgg) {
                    "plan"
                } else {
                    "conv_widths"
                },
                format!(
                    "about {:.3e} parameters; the limit is {MAX_PARAMS:.0e} (2 GB of weights)",
                    params
                ),
            ));
        }
        Ok(())
    }

    /// Builds the model with freshly initialised weights on `device`.
    pub fn build(&self, device: &Device) -> Result<Model> {
        self.validate()?;
        let model = self.build_layers(device);
        let family = self.name.family();
        let scheme = match self.init {
            None | Some(Init::Default) => None,
            Some(Init::Xavier) => Some(init::Scheme::Xavier),
            Some(Init::Kaiming) => Some(init::Scheme::Kaiming),
            // AlexNet's paper rule is applied by its own config; ResNet's paper is He init.
            Some(Init::Paper) if family == Family::AlexNet => None,
            Some(Init::Paper) if family == Family::ResNet => Some(init::Scheme::Kaiming),
            Some(Init::Paper) => Some(init::Scheme::Gaussian(0.01)),
        };
        Ok(match scheme {
            Some(s) => init::apply(model, s),
            None => model,
        })
    }

    fn build_layers(&self, device: &Device) -> Model {
        match self.name.family() {
            Family::AlexNet | Family::ZfNet => {
                Model::AlexNet(AlexNetConfig::from_options(self).init(device))
            }
            Family::ConvNet => Model::ConvNet(ConvNetConfig::from_options(self).init(device)),
            Family::Vgg => Model::Vgg(VggConfig::from_options(self).init(device)),
            Family::GoogLeNet => Model::GoogLeNet(GoogLeNetConfig::from_options(self).init(device)),
            Family::ResNet => Model::ResNet(ResNetConfig::from_options(self).init(device)),
        }
    }

    /// Multiply-adds x 2 of one forward pass at the configured input size (convolutions and
    /// linear layers; GoogLeNet's training-only auxiliary heads excluded), from the shape trace
    /// of the built model ([`Model::trace`]). The model is built lazily on `device`: no weight
    /// is initialised.
    pub fn flops(&self, device: &Device) -> Result<f64> {
        let s = self.input_size;
        Ok(self.build(device)?.trace([self.in_channels, s, s]).flops())
    }
}
