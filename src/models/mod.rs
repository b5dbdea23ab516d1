//! The model zoo: one file per family, one [`Model`] type that dispatches to them, and the
//! registry [`ModelName`], a serialisable enum (no global state).
//!
//! Every model offers the same interface: [`Model::forward_features`] (the last feature map),
//! [`Model::forward_head`] (features to logits), [`Model::forward`], [`Model::feature_maps`]
//! (named intermediate maps, for visualisation and per-layer analysis), [`Model::num_classes`]
//! and [`Model::with_classes`] (a fresh head, for fine-tuning).

pub mod alexnet;
pub mod convnet;
pub mod googlenet;
pub mod init;
mod model;
pub mod resnet;
pub mod vgg;
pub mod zfnet;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layers::PoolKind;
use crate::layers::trunk::{Plan, parse_plan};
use alexnet::AlexNetConfig;
use convnet::ConvNetConfig;
use googlenet::GoogLeNetConfig;
pub use init::Init;
pub use model::{Model, TrainOutput, param_count};
use resnet::ResNetConfig;
use vgg::VggConfig;

/// Model families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    AlexNet,
    ZfNet,
    ConvNet,
    Vgg,
    GoogLeNet,
    ResNet,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::AlexNet => "alexnet",
            Family::ZfNet => "zfnet",
            Family::ConvNet => "convnet",
            Family::Vgg => "vgg",
            Family::GoogLeNet => "googlenet",
            Family::ResNet => "resnet",
        }
    }
}

macro_rules! registry {
    ($( $(#[$doc:meta])* $var:ident = $name:literal, $family:ident, $size:literal; )*) => {
        /// Every registered model, by its command-line name.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum ModelName {
            $( $(#[$doc])* #[serde(rename = $name)] $var, )*
        }

        impl ModelName {
            /// All registered names, in listing order.
            pub const ALL: &'static [ModelName] = &[$(ModelName::$var),*];

            /// The command-line name.
            pub fn as_str(self) -> &'static str {
                match self { $(ModelName::$var => $name),* }
            }

            /// The family the model belongs to.
            pub fn family(self) -> Family {
                match self { $(ModelName::$var => Family::$family),* }
            }

            /// Input side the model is designed for (pixels).
            pub fn default_input_size(self) -> usize {
                match self { $(ModelName::$var => $size),* }
            }
        }
    };
}

registry! {
    /// Default: conv3x3-BN-ReLU 32-M-64-M-128-128, GAP, linear. For 28-32 px input.
    ConvnetSmall = "convnet_small", ConvNet, 28;
    /// The peer-comparison VGG: 64-64-M-128-128-M-256-256-M, BN, GAP, linear; 32x32 RGB.
    BenchVgg = "bench-vgg", ConvNet, 32;
    /// AlexNet, torchvision's single-tower layout.
    Alexnet = "alexnet", AlexNet, 224;
    /// AlexNet as in the paper: 96-256-384-384-256, LRN, grouped convs, paper init.
    AlexnetPaper = "alexnet_paper", AlexNet, 224;
    /// AlexNet scaled for 28-32 px input (see `alexnet.rs`).
    AlexnetSmall = "alexnet_small", AlexNet, 32;
    /// ZFNet: 7x7/2 first layer, 5x5/2 second.
    Zfnet = "zfnet", ZfNet, 224;
    /// ZFNet scaled for 28-32 px input (see `zfnet.rs`).
    ZfnetSmall = "zfnet_small", ZfNet, 32;
    /// VGG configuration A (11 layers).
    Vgg11 = "vgg11", Vgg, 224;
    /// VGG A-LRN: A with local response normalisation after the first conv.
    Vgg11Lrn = "vgg11_lrn", Vgg, 224;
    /// VGG configuration B (13 layers).
    Vgg13 = "vgg13", Vgg, 224;
    /// VGG configuration C (16 layers, three 1x1 convs).
    Vgg16C = "vgg16_c", Vgg, 224;
    /// VGG configuration D (16 layers).
    Vgg16 = "vgg16", Vgg, 224;
    /// VGG configuration E (19 layers).
    Vgg19 = "vgg19", Vgg, 224;
    /// VGG A with batch norm (torchvision).
    Vgg11Bn = "vgg11_bn", Vgg, 224;
    /// VGG B with batch norm.
    Vgg13Bn = "vgg13_bn", Vgg, 224;
    /// VGG D with batch norm.
    Vgg16Bn = "vgg16_bn", Vgg, 224;
    /// VGG E with batch norm.
    Vgg19Bn = "vgg19_bn", Vgg, 224;
    /// VGG A scaled for 28-32 px input (see `vgg.rs`).
    Vgg11Small = "vgg11_small", Vgg, 32;
    /// GoogLeNet (Inception v1) as in the paper, with auxiliary classifiers.
    Googlenet = "googlenet", GoogLeNet, 224;
    /// GoogLeNet in torchvision's layout (BN, 3x3 in the "5x5" branch).
    GooglenetTv = "googlenet_tv", GoogLeNet, 224;
    /// GoogLeNet scaled for 28-32 px input (see `googlenet.rs`).
    GooglenetSmall = "googlenet_small", GoogLeNet, 32;
    /// ResNet-18 (basic blocks 2-2-2-2).
    Resnet18 = "resnet18", ResNet, 224;
    /// ResNet-34 (basic blocks 3-4-6-3).
    Resnet34 = "resnet34", ResNet, 224;
    /// ResNet-50 (bottlenecks 3-4-6-3), torchvision's ResNet-B layout.
    Resnet50 = "resnet50", ResNet, 224;
    /// ResNet-50-D of "Bag of Tricks": deep stem and average-pool shortcuts.
    Resnet50D = "resnet50_d", ResNet, 224;
    /// ResNet-18 scaled for 28-32 px input (see `resnet.rs`).
    Resnet18Small = "resnet18_small", ResNet, 32;
}

impl ModelName {
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

    /// The default layer plan of a plain (convnet or VGG) model; empty for other families.
    pub fn plan(self) -> &'static str {
        use ModelName::*;
        match self {
            ConvnetSmall => "32,M,64,M,128,128",
            BenchVgg => "64,64,M,128,128,M,256,256,M",
            Vgg11 | Vgg11Lrn | Vgg11Bn => vgg::VGG_A,
            Vgg13 | Vgg13Bn => vgg::VGG_B,
            Vgg16C => vgg::VGG_C,
            Vgg16 | Vgg16Bn => vgg::VGG_D,
            Vgg19 | Vgg19Bn => vgg::VGG_E,
            Vgg11Small => vgg::VGG_A_SMALL,
            _ => "",
        }
    }

    /// Whether the model has batch norm unless the recipe says otherwise.
    pub fn default_batch_norm(self) -> bool {
        use ModelName::*;
        matches!(
            self,
            ConvnetSmall
                | BenchVgg
                | Vgg11Bn
                | Vgg13Bn
                | Vgg16Bn
                | Vgg19Bn
                | Vgg11Small
                | GooglenetTv
                | GooglenetSmall
                | Resnet18
                | Resnet34
                | Resnet50
                | Resnet50D
                | Resnet18Small
        )
    }

    /// Whether the model is a small-input variant (trains on 28-32 px data in minutes).
    pub fn is_small(self) -> bool {
        self.default_input_size() <= 32
    }
}

impl std::fmt::Display for ModelName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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

    fn batch_norm(&self) -> bool {
        self.batch_norm.unwrap_or(self.name.default_batch_norm())
    }

    /// Checks the options that do not depend on the data (run before anything is written).
    pub fn validate_options(&self) -> Result<()> {
        let c = ModelConfig {
            num_classes: 2,
            in_channels: 3,
            input_size: 1 << 16,
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
        let pools = match self.name.family() {
            Family::AlexNet | Family::ZfNet => {
                if self.plan.is_some() {
                    return Err(bad(
                        "plan",
                        "only plain (convnet, vgg) models take a plan".into(),
                    ));
                }
                if self.name.is_small() { 4 } else { 6 }
            }
            Family::ConvNet | Family::Vgg => parse_plan(self.plan())
                .map_err(|e| bad("plan", e))?
                .iter()
                .filter(|p| **p == Plan::Pool)
                .count(),
            Family::GoogLeNet => {
                if self.plan.is_some() {
                    return Err(bad(
                        "plan",
                        "only plain (convnet, vgg) models take a plan".into(),
                    ));
                }
                if self.name.is_small() { 3 } else { 5 }
            }
            Family::ResNet => {
                if self.plan.is_some() {
                    return Err(bad(
                        "plan",
                        "only plain (convnet, vgg) models take a plan".into(),
                    ));
                }
                if self.name.is_small() { 3 } else { 5 }
            }
        };
        if self.batch_norm == Some(false) && self.name.family() == Family::ResNet {
            return Err(bad(
                "batch_norm",
                "ResNets are built with batch norm".into(),
            ));
        }
        let family = self.name.family();
        if self.lrn == Some(true) && matches!(family, Family::ConvNet | Family::ResNet) {
            return Err(bad("lrn", format!("{} has no LRN layers", self.name)));
        }
        if self.zero_gamma && family != Family::ResNet {
            return Err(bad(
                "zero_gamma",
                format!("only ResNets have residual blocks, not {}", self.name),
            ));
        }
        if (self.pool != PoolKind::Max || self.overlapping_pool.is_some())
            && matches!(family, Family::ResNet | Family::GoogLeNet)
        {
            return Err(bad(
                "pool",
                format!(
                    "{} keeps its own pooling; pool and overlapping_pool do not apply",
                    self.name
                ),
            ));
        }
        if self.init == Some(Init::Paper)
            && matches!(self.name.family(), Family::ConvNet | Family::GoogLeNet)
        {
            return Err(bad(
                "init",
                format!(
                    "{} has no paper initialisation; use xavier or kaiming",
                    self.name
                ),
            ));
        }
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

    fn convnet(&self) -> ConvNetConfig {
        ConvNetConfig::new(self.plan().to_string(), self.num_classes)
            .with_in_channels(self.in_channels)
            .with_batch_norm(self.batch_norm())
            .with_pool(self.pool)
            .with_pool_kernel(if self.overlapping_pool == Some(true) {
                3
            } else {
                2
            })
            .with_dropout(self.dropout.unwrap_or(0.0))
    }

    fn vgg(&self) -> VggConfig {
        let small = self.name == ModelName::Vgg11Small;
        VggConfig::new(self.plan().to_string(), self.num_classes)
            .with_in_channels(self.in_channels)
            .with_batch_norm(self.batch_norm())
            .with_lrn(self.lrn.unwrap_or(self.name == ModelName::Vgg11Lrn))
            .with_pool(self.pool)
            .with_pool_kernel(if self.overlapping_pool == Some(true) {
                3
            } else {
                2
            })
            .with_dropout(self.dropout.unwrap_or(0.5))
            .with_hidden(if small { 256 } else { 4096 })
            .with_head_pool(if small { 1 } else { 7 })
    }

    fn alexnet(&self) -> AlexNetConfig {
        use ModelName::*;
        let k = self.num_classes;
        let mut c = match self.name {
            AlexnetPaper => alexnet::alexnet_paper(k),
            AlexnetSmall => alexnet::alexnet_small(k),
            Zfnet => zfnet::zfnet(k),
            ZfnetSmall => zfnet::zfnet_small(k),
            _ => alexnet::alexnet(k),
        };
        c.in_channels = self.in_channels;
        c.pool = self.pool;
        match self.init {
            Some(Init::Paper) if self.name.family() == Family::AlexNet => c.paper_init = true,
            Some(_) => c.paper_init = false,
            None => {}
        }
        if let Some(o) = self.overlapping_pool {
            c.overlapping = o;
        }
        if let Some(d) = self.dropout {
            c.dropout = d;
        }
        if let Some(bn) = self.batch_norm {
            c.batch_norm = bn;
        }
        match self.lrn {
            Some(false) => c.lrn_after.clear(),
            Some(true) if c.lrn_after.is_empty() => c.lrn_after = vec![0, 1],
            _ => {}
        }
        c
    }

    fn googlenet(&self) -> GoogLeNetConfig {
        use ModelName::*;
        let paper = self.name == Googlenet;
        let mut c = GoogLeNetConfig::new(self.num_classes)
            .with_in_channels(self.in_channels)
            .with_batch_norm(self.batch_norm())
            .with_lrn(self.lrn.unwrap_or(paper))
            .with_true_5x5(self.name != GooglenetTv)
            .with_dropout(self.dropout.unwrap_or(if paper { 0.4 } else { 0.2 }));
        if self.name == GooglenetSmall {
            c = c.with_width_div(4).with_small_stem(true);
        }
        c
    }

    fn resnet(&self) -> ResNetConfig {
        use ModelName::*;
        let (layers, bottleneck) = match self.name {
            Resnet34 | Resnet50 | Resnet50D => ([3, 4, 6, 3], self.name != Resnet34),
            _ => ([2, 2, 2, 2], false),
        };
        let mut c = ResNetConfig::new(layers, bottleneck, self.num_classes)
            .with_in_channels(self.in_channels)
            .with_zero_gamma(self.zero_gamma);
        if self.name == Resnet50D {
            c = c.with_stem("deep".into()).with_avg_down(true);
        }
        if self.name == Resnet18Small {
            c = c.with_stem("cifar".into()).with_widths([16, 32, 64, 128]);
        }
        c
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
            Family::AlexNet | Family::ZfNet => Model::AlexNet(self.alexnet().init(device)),
            Family::ConvNet => Model::ConvNet(self.convnet().init(device)),
            Family::Vgg => Model::Vgg(self.vgg().init(device)),
            Family::GoogLeNet => Model::GoogLeNet(self.googlenet().init(device)),
            Family::ResNet => Model::ResNet(self.resnet().init(device)),
        }
    }

    /// Multiply-adds x 2 of one forward pass at the configured input size, from layer shapes.
    pub fn flops(&self) -> f64 {
        match self.name.family() {
            Family::AlexNet | Family::ZfNet => self.alexnet().flops(self.input_size),
            Family::ConvNet => self.convnet().flops(self.input_size),
            Family::Vgg => self.vgg().flops(self.input_size),
            Family::GoogLeNet => self.googlenet().flops(self.input_size),
            Family::ResNet => self.resnet().flops(self.input_size),
        }
    }
}
