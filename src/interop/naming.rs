//! The other frameworks' names for convlab's tensors: one function per layout that turns a
//! convlab key (`ResNet.stages.0.1.convs.0.bn.gamma`) into torchvision's or timm's
//! (`layer1.1.bn1.weight`). Import reads each convlab key's foreign name from it; export (the
//! reverse direction) uses the same table, so the two can never disagree.
//!
//! Layouts follow the sources: torchvision's `resnet.py` (`conv1`, `bn1`, `layerN.B.convI`,
//! `downsample.0/1`, `fc`), `vgg.py` (`features.i` in `nn.Sequential` order, `classifier.0/3/6`),
//! `alexnet.py` (`features.0/3/6/8/10`, `classifier.1/4/6`), `googlenet.py` (`conv1..3`,
//! `inception3a..5b.branchN`, `aux1/2`, `fc`; the BN of `BasicConv2d` is `.bn`), and timm's
//! `resnet.py` for `resnet50d` (deep stem `conv1.0/1/3/4/6` + `bn1`, shortcut
//! `downsample.1/2` after an average pool at `downsample.0`).

use crate::models::{Family, ModelName};

/// A naming of state-dict keys.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// torchvision's `state_dict()` keys.
    Torchvision,
    /// timm's keys (the ResNets; `resnet50_d` is timm's `resnet50d`).
    Timm,
    /// convlab's own keys (module paths, as in its checkpoints).
    Convlab,
}

impl Naming {
    pub fn as_str(self) -> &'static str {
        match self {
            Naming::Torchvision => "torchvision",
            Naming::Timm => "timm",
            Naming::Convlab => "convlab",
        }
    }
}

/// Whether `model` exists in `naming` (convlab's own naming has every model).
pub fn supports(model: ModelName, naming: Naming) -> bool {
    use ModelName::*;
    match naming {
        Naming::Convlab => true,
        Naming::Torchvision => matches!(
            model,
            Alexnet
                | Vgg11
                | Vgg13
                | Vgg16
                | Vgg19
                | Vgg11Bn
                | Vgg13Bn
                | Vgg16Bn
                | Vgg19Bn
                | GooglenetTv
                | Resnet18
                | Resnet34
                | Resnet50
        ),
        Naming::Timm => matches!(model, Resnet18 | Resnet34 | Resnet50 | Resnet50D),
    }
}

/// The models a naming has, for error messages.
pub fn supported_models(naming: Naming) -> Vec<&'static str> {
    ModelName::ALL
        .iter()
        .filter(|m| supports(**m, naming))
        .map(|m| m.as_str())
        .collect()
}

/// Whether the foreign tensor is stored transposed relative to convlab's: Burn's `Linear`
/// keeps its weight as `[in, out]`, PyTorch's `nn.Linear` as `[out, in]`.
pub fn transposed(convlab_key: &str, shape: &[usize]) -> bool {
    shape.len() == 2 && convlab_key.ends_with(".weight")
}

/// The key `naming` gives convlab's tensor `key` in `model`, or `None` for a tensor that layout
/// does not have (GoogLeNet's auxiliary classifiers, which import leaves as initialised).
pub fn foreign_key(model: ModelName, naming: Naming, key: &str) -> Option<String> {
    if naming == Naming::Convlab {
        return Some(key.to_string());
    }
    let (family, rest) = key.split_once('.')?;
    // Burn's BatchNorm calls PyTorch's `weight`/`bias` `gamma`/`beta`.
    let rest = rest
        .replace(".bn.gamma", ".bn.weight")
        .replace(".bn.beta", ".bn.bias");
    let parts: Vec<&str> = rest.split('.').collect();
    match (model.family(), family) {
        (Family::ResNet, "ResNet") => resnet(model, naming, &parts),
        (Family::Vgg, "Vgg") => vgg(model, &parts),
        (Family::AlexNet, "AlexNet") => alexnet(&parts),
        (Family::GoogLeNet, "GoogLeNet") => googlenet(&parts),
        _ => None,
    }
}

/// `conv.weight` / `bn.<p>` of a conv + BN pair, as `<conv>.weight` / `<bn>.<p>`.
fn conv_bn(tail: &[&str], conv: &str, bn: &str) -> Option<String> {
    match tail {
        ["conv", p] => Some(format!("{conv}.{p}")),
        ["bn", p] => Some(format!("{bn}.{p}")),
        _ => None,
    }
}

fn resnet(model: ModelName, naming: Naming, p: &[&str]) -> Option<String> {
    let deep = model == ModelName::Resnet50D;
    match p {
        ["stem", i, tail @ ..] if !deep => (*i == "0").then(|| conv_bn(tail, "conv1", "bn1"))?,
        ["stem", i, tail @ ..] => {
            let (conv, bn) = match *i {
                "0" => ("conv1.0", "conv1.1".to_string()),
                "1" => ("conv1.3", "conv1.4".to_string()),
                "2" => ("conv1.6", "bn1".to_string()),
                _ => return None,
            };
            conv_bn(tail, conv, &bn)
        }
        ["stages", s, b, "convs", i, tail @ ..] => {
            let stage = s.parse::<usize>().ok()? + 1;
            let n = i.parse::<usize>().ok()? + 1;
            let base = format!("layer{stage}.{b}");
            conv_bn(tail, &format!("{base}.conv{n}"), &format!("{base}.bn{n}"))
        }
        ["stages", s, b, "down", "proj", tail @ ..] => {
            let stage = s.parse::<usize>().ok()? + 1;
            let base = format!("layer{stage}.{b}.downsample");
            // timm's ResNet-D shortcut starts with its average pool at index 0.
            let first = usize::from(deep && naming == Naming::Timm);
            conv_bn(
                tail,
                &format!("{base}.{first}"),
                &format!("{base}.{}", first + 1),
            )
        }
        ["fc", t] => Some(format!("fc.{t}")),
        _ => None,
    }
}

fn vgg(model: ModelName, p: &[&str]) -> Option<String> {
    let bn = model.default_batch_norm();
    match p {
        ["trunk", "convs", i, layer, t] => {
            // The position of conv `i` in torchvision's `features` Sequential: each conv is
            // followed by its BN (in the `_bn` models) and ReLU, each `M` is one MaxPool.
            let i: usize = i.parse().ok()?;
            let mut at = 0;
            let mut conv = 0;
            for tok in model.plan().split(',') {
                if tok.trim() == "M" {
                    at += 1;
                    continue;
                }
                if conv == i {
                    return match *layer {
                        "conv" => Some(format!("features.{at}.{t}")),
                        "bn" if bn => Some(format!("features.{}.{t}", at + 1)),
                        _ => None,
                    };
                }
                conv += 1;
                at += if bn { 3 } else { 2 };
            }
            None
        }
        ["fc6", t] => Some(format!("classifier.0.{t}")),
        ["fc7", t] => Some(format!("classifier.3.{t}")),
        ["fc8", t] => Some(format!("classifier.6.{t}")),
        _ => None,
    }
}

fn alexnet(p: &[&str]) -> Option<String> {
    const AT: [usize; 5] = [0, 3, 6, 8, 10];
    match p {
        ["convs", i, t] => Some(format!(
            "features.{}.{t}",
            AT.get(i.parse::<usize>().ok()?)?
        )),
        ["fc6", t] => Some(format!("classifier.1.{t}")),
        ["fc7", t] => Some(format!("classifier.4.{t}")),
        ["fc8", t] => Some(format!("classifier.6.{t}")),
        _ => None,
    }
}

fn googlenet(p: &[&str]) -> Option<String> {
    const BLOCKS: [&str; 9] = [
        "inception3a",
        "inception3b",
        "inception4a",
        "inception4b",
        "inception4c",
        "inception4d",
        "inception4e",
        "inception5a",
        "inception5b",
    ];
    match p {
        ["stem", i, tail @ ..] => {
            let n = i.parse::<usize>().ok()? + 1;
            conv_bn(tail, &format!("conv{n}.conv"), &format!("conv{n}.bn"))
        }
        ["blocks", i, branch, tail @ ..] => {
            let block = BLOCKS.get(i.parse::<usize>().ok()?)?;
            let b = match *branch {
                "b1" => "branch1",
                "b2_reduce" => "branch2.0",
                "b2" => "branch2.1",
                "b3_reduce" => "branch3.0",
                "b3" => "branch3.1",
                "b4" => "branch4.1",
                _ => return None,
            };
            conv_bn(
                tail,
                &format!("{block}.{b}.conv"),
                &format!("{block}.{b}.bn"),
            )
        }
        ["fc", t] => Some(format!("fc.{t}")),
        _ => None,
    }
}

/// The key export writes for convlab's tensor `key`: [`foreign_key`], plus GoogLeNet's
/// auxiliary classifiers (`aux.0.*` -> `aux1.*`), which import skips but torchvision's
/// `googlenet(aux_logits=True)` (its default without weights) needs under `strict=True`.
pub fn export_key(model: ModelName, naming: Naming, key: &str) -> Option<String> {
    if let Some(k) = foreign_key(model, naming, key) {
        return Some(k);
    }
    if naming != Naming::Torchvision || model.family() != Family::GoogLeNet {
        return None;
    }
    let rest = key.strip_prefix("GoogLeNet.aux.")?;
    let (i, rest) = rest.split_once('.')?;
    let n = i.parse::<usize>().ok()? + 1;
    let rest = rest
        .replace(".bn.gamma", ".bn.weight")
        .replace(".bn.beta", ".bn.bias");
    Some(format!("aux{n}.{rest}"))
}

/// Foreign keys a layout has that convlab does not read: BN's step counter and GoogLeNet's
/// auxiliary classifiers (`aux1.*`, `aux2.*`; convlab keeps its own, freshly initialised).
pub fn ignored(naming: Naming, key: &str) -> bool {
    key.ends_with("num_batches_tracked")
        || (naming != Naming::Convlab && (key.starts_with("aux1.") || key.starts_with("aux2.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_torchvision_and_timm() {
        use ModelName::*;
        let tv = Naming::Torchvision;
        let k = |m, n, key| foreign_key(m, n, key);
        assert_eq!(
            k(Resnet18, tv, "ResNet.stem.0.conv.weight").unwrap(),
            "conv1.weight"
        );
        assert_eq!(
            k(Resnet18, tv, "ResNet.stem.0.bn.gamma").unwrap(),
            "bn1.weight"
        );
        assert_eq!(
            k(Resnet50, tv, "ResNet.stages.2.3.convs.2.bn.running_var").unwrap(),
            "layer3.3.bn3.running_var"
        );
        assert_eq!(
            k(Resnet18, tv, "ResNet.stages.1.0.down.proj.bn.beta").unwrap(),
            "layer2.0.downsample.1.bias"
        );
        let timm = Naming::Timm;
        assert_eq!(
            k(Resnet50D, timm, "ResNet.stem.1.bn.gamma").unwrap(),
            "conv1.4.weight"
        );
        assert_eq!(
            k(Resnet50D, timm, "ResNet.stem.2.bn.gamma").unwrap(),
            "bn1.weight"
        );
        assert_eq!(
            k(Resnet50D, timm, "ResNet.stages.0.0.down.proj.conv.weight").unwrap(),
            "layer1.0.downsample.1.weight"
        );
        // vgg16_bn: conv 2 (the first 128) sits after conv, bn, relu, conv, bn, relu, pool.
        assert_eq!(
            k(Vgg16Bn, tv, "Vgg.trunk.convs.2.conv.weight").unwrap(),
            "features.7.weight"
        );
        assert_eq!(
            k(Vgg16Bn, tv, "Vgg.trunk.convs.2.bn.gamma").unwrap(),
            "features.8.weight"
        );
        assert_eq!(
            k(Vgg16, tv, "Vgg.trunk.convs.2.conv.bias").unwrap(),
            "features.5.bias"
        );
        assert_eq!(
            k(Vgg16, tv, "Vgg.fc8.weight").unwrap(),
            "classifier.6.weight"
        );
        assert_eq!(
            k(Alexnet, tv, "AlexNet.convs.4.weight").unwrap(),
            "features.10.weight"
        );
        assert_eq!(
            k(GooglenetTv, tv, "GoogLeNet.blocks.8.b4.bn.running_mean").unwrap(),
            "inception5b.branch4.1.bn.running_mean"
        );
        assert_eq!(k(GooglenetTv, tv, "GoogLeNet.aux.0.fc2.weight"), None);
        assert_eq!(
            export_key(GooglenetTv, tv, "GoogLeNet.aux.1.conv.bn.gamma").unwrap(),
            "aux2.conv.bn.weight"
        );
        assert_eq!(
            export_key(GooglenetTv, tv, "GoogLeNet.stem.0.conv.weight").unwrap(),
            "conv1.conv.weight"
        );
        assert!(transposed("ResNet.fc.weight", &[512, 10]));
        assert!(!transposed("ResNet.fc.bias", &[10]));
        assert!(supports(Resnet50D, timm) && !supports(Resnet50D, tv));
    }
}
