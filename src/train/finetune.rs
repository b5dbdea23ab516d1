//! `[finetune]`: training from pretrained weights with the backbone frozen for a while
//! and/or at a lower learning rate, as timm's and fast.ai's fine-tuning does (Howard & Ruder
//! 2018, "Universal Language Model Fine-tuning": gradual unfreezing and discriminative
//! learning rates; Kornblith et al. 2019 for ImageNet transfer).
//!
//! "Backbone" is every tensor but the classifier's, found as the tensors whose shapes follow
//! the class count. A frozen layer gets no gradient and no update, and its batch norms run in
//! eval mode on their running statistics (Burn's `Module::freeze` clears their training flag),
//! so the pretrained statistics are not overwritten by a few small batches.

use std::collections::BTreeSet;

use burn::module::{Module, ParamGroup};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::Model;

/// What is frozen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    /// Every layer trains.
    #[default]
    None,
    /// Everything but the classifier is frozen (until `unfreeze_epoch`).
    Backbone,
}

/// `[finetune]` of a recipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub freeze: Freeze,
    /// With `freeze = "backbone"`: the first epoch (1-based) that trains every layer; 0 keeps
    /// the backbone frozen for the whole run.
    pub unfreeze_epoch: usize,
    /// Learning rate of the backbone as a fraction of the schedule's (discriminative learning
    /// rates; 0.1 is a common choice for ImageNet weights). 1 = one rate for all.
    pub backbone_lr_mult: f64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            freeze: Freeze::None,
            unfreeze_epoch: 0,
            backbone_lr_mult: 1.0,
        }
    }
}

impl FinetuneConfig {
    pub fn validate(&self, epochs: usize) -> Result<()> {
        let bad = |key: &str, reason: String| Error::Recipe {
            origin: String::new(),
            key: format!("finetune.{key}"),
            reason,
        };
        if !(self.backbone_lr_mult.is_finite() && self.backbone_lr_mult >= 0.0) {
            return Err(bad(
                "backbone_lr_mult",
                format!("{} (must be a number >= 0)", self.backbone_lr_mult),
            ));
        }
        if self.unfreeze_epoch > epochs {
            return Err(bad(
                "unfreeze_epoch",
                format!("{} is past the last epoch ({epochs})", self.unfreeze_epoch),
            ));
        }
        if self.unfreeze_epoch > 0 && self.freeze == Freeze::None {
            return Err(bad(
                "unfreeze_epoch",
                "needs freeze = \"backbone\" (nothing is frozen)".into(),
            ));
        }
        Ok(())
    }

    /// Whether the backbone is frozen during `epoch` (1-based).
    pub fn frozen_at(&self, epoch: usize) -> bool {
        self.freeze == Freeze::Backbone && (self.unfreeze_epoch == 0 || epoch < self.unfreeze_epoch)
    }

    /// Whether any of it applies (else the trainer leaves the model exactly as it was).
    pub fn active(&self) -> bool {
        self.freeze != Freeze::None || self.backbone_lr_mult != 1.0
    }
}

/// The module paths of the classifier's tensors: those whose shapes change with the class
/// count (for GoogLeNet also its auxiliary classifiers' last layers).
pub fn classifier_keys(model: &Model, device: &Device) -> BTreeSet<String> {
    let k = model.num_classes();
    let a = crate::params::module_shapes(model);
    let b = crate::params::module_shapes(&model.clone().with_classes(k + 1, device));
    a.into_iter()
        .filter(|(key, s)| b.get(key) != Some(s))
        .map(|(key, _)| key)
        .collect()
}

/// The model with its backbone frozen (`frozen`) or every layer trainable.
pub fn set_backbone_frozen(model: Model, head: &BTreeSet<String>, frozen: bool) -> Model {
    if !frozen {
        return model.unfreeze();
    }
    let ids = crate::params::param_ids(&model, |path| head.contains(path));
    model.freeze().unfreeze_group(ParamGroup::from_ids(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_epochs_follow_the_recipe() {
        let mut f = FinetuneConfig {
            freeze: Freeze::Backbone,
            unfreeze_epoch: 3,
            backbone_lr_mult: 0.1,
        };
        assert_eq!(
            (1..=4).map(|e| f.frozen_at(e)).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        f.unfreeze_epoch = 0;
        assert!(f.frozen_at(100));
        assert!(f.validate(10).is_ok());
        f.unfreeze_epoch = 11;
        assert!(
            f.validate(10)
                .unwrap_err()
                .to_string()
                .contains("finetune.unfreeze_epoch")
        );
        let none = FinetuneConfig::default();
        assert!(!none.frozen_at(1) && !none.active());
        let e = FinetuneConfig {
            backbone_lr_mult: -1.0,
            ..none
        };
        assert!(e.validate(10).is_err());
    }

    #[test]
    fn the_classifier_is_what_follows_the_class_count() {
        use crate::models::{ModelConfig, ModelName};
        let device = Device::flex();
        let m = ModelConfig::for_model(ModelName::Resnet18Small, 10, 3)
            .build(&device)
            .unwrap();
        let keys: Vec<String> = classifier_keys(&m, &device).into_iter().collect();
        assert_eq!(keys, ["ResNet.fc.bias", "ResNet.fc.weight"]);
    }
}
