//! The model zoo: one file per family, one [`Model`] type that dispatches to them, and the
//! registry [`ModelName`], a serialisable enum (no global state).
//!
//! Every model offers the same interface: [`Model::forward_features`] (the last feature map),
//! [`Model::forward_head`] (features to logits), [`Model::forward`], [`Model::feature_maps`]
//! (named intermediate maps, for visualisation and per-layer analysis), [`Model::num_classes`]
//! and [`Model::with_classes`] (a fresh head, for fine-tuning).

pub mod alexnet;
mod config;
pub mod convnet;
pub mod googlenet;
pub mod init;
mod model;
pub mod resnet;
pub mod vgg;
pub mod zfnet;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use config::ModelConfig;
pub use init::Init;
pub use model::{Model, TrainOutput, param_count};

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

/// The recipe options a family takes beyond the common ones (`name`, `num_classes`,
/// `in_channels`, `input_size`, `dropout`, `batch_norm`, xavier/kaiming/default `init`,
/// `pretrained`): each family file declares its own as `OPTIONS`, and
/// [`ModelConfig::validate`] refuses the rest by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// `hidden`, `conv_widths`, `remove_convs`.
    pub alexnet_shape: bool,
    /// `plan`.
    pub plan: bool,
    /// `batch_norm = false` is refused (ResNets).
    pub batch_norm_required: bool,
    /// `lrn = true`.
    pub lrn: bool,
    /// `zero_gamma`.
    pub zero_gamma: bool,
    /// `pool` and `overlapping_pool`.
    pub pooling: bool,
    /// `init = "paper"`.
    pub paper_init: bool,
}

impl Options {
    /// Nothing beyond the common options.
    pub const NONE: Options = Options {
        alexnet_shape: false,
        plan: false,
        batch_norm_required: false,
        lrn: false,
        zero_gamma: false,
        pooling: false,
        paper_init: false,
    };
}

impl Family {
    pub const ALL: [Family; 6] = [
        Family::AlexNet,
        Family::ZfNet,
        Family::ConvNet,
        Family::Vgg,
        Family::GoogLeNet,
        Family::ResNet,
    ];

    /// The options the family takes (its file's `OPTIONS`).
    pub fn options(self) -> Options {
        match self {
            Family::AlexNet | Family::ZfNet => alexnet::OPTIONS,
            Family::ConvNet => convnet::OPTIONS,
            Family::Vgg => vgg::OPTIONS,
            Family::GoogLeNet => googlenet::OPTIONS,
            Family::ResNet => resnet::OPTIONS,
        }
    }

    /// Whether the family's models keep their activations in bf16 between layers when they
    /// compute in bf16 and bf16 activations are selected ([`crate::layers::activations`],
    /// called at the top of their `features`): the plain ConvNets, VGG and ResNet. AlexNet's
    /// LRN and GoogLeNet's concatenations are Burn ops, kept in f32.
    pub fn keeps_bf16_activations(self) -> bool {
        matches!(self, Family::ConvNet | Family::Vgg | Family::ResNet)
    }

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
        match self.family() {
            Family::ConvNet => convnet::default_plan(self),
            Family::Vgg => vgg::default_plan(self),
            _ => "",
        }
    }

    /// Whether the model has batch norm unless the recipe says otherwise.
    pub fn default_batch_norm(self) -> bool {
        match self.family() {
            Family::ConvNet | Family::ResNet => true,
            Family::Vgg => vgg::default_batch_norm(self),
            Family::GoogLeNet => self != ModelName::Googlenet,
            Family::AlexNet | Family::ZfNet => false,
        }
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
