//! Runs over every registered model: output shape, no NaN, one backward pass reaches every
//! trainable parameter, `with_classes`, named feature maps, and config round trip through TOML.

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::prelude::*;
use convlab::models::{ModelConfig, ModelName};
use convlab::params::{Site, TensorVisitor};

struct Trainable {
    params: Vec<(String, burn::module::ParamId, usize)>,
}

impl TensorVisitor for Trainable {
    fn tensor<const D: usize>(&mut self, site: &Site, p: &Param<Tensor<D>>) {
        if p.val().is_require_grad() {
            self.params.push((site.path(), p.id, D));
        }
    }
}

fn has_grad(g: &GradientsParams, id: burn::module::ParamId, rank: usize) -> bool {
    match rank {
        1 => g.get::<1>(id).is_some(),
        2 => g.get::<2>(id).is_some(),
        4 => g.get::<4>(id).is_some(),
        r => panic!("unexpected rank {r}"),
    }
}

#[test]
fn every_registered_model() {
    let device = Device::flex().autodiff();
    device.seed(1);
    for &name in ModelName::ALL {
        // Full-size models at a small valid input keep the suite fast; their heads adapt.
        let mut cfg = ModelConfig::for_model(name, 7, 3);
        cfg.input_size = cfg.input_size.min(64);
        let model = cfg.build(&device).unwrap();
        assert_eq!(model.num_classes(), 7, "{name}");
        let s = cfg.input_size;
        let x = Tensor::<4>::random(
            [2, 3, s, s],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let y = model.forward(x.clone());
        assert_eq!(y.dims(), [2, 7], "{name}");
        let host: Vec<f32> = y.clone().into_data().convert::<f32>().try_to_vec().unwrap();
        assert!(
            host.iter().all(|v| v.is_finite()),
            "{name}: non-finite output"
        );

        // The training forward reaches the auxiliary heads too (GoogLeNet).
        let out = model.forward_train(x.clone());
        let mut total = out.logits.sum();
        for a in out.aux {
            assert_eq!(a.dims(), [2, 7], "{name} aux");
            total = total + a.sum();
        }
        let grads = GradientsParams::from_grads(total.backward(), &model);
        let mut v = Trainable { params: vec![] };
        convlab::params::visit(&model, &mut v);
        assert!(!v.params.is_empty());
        for (path, id, rank) in &v.params {
            assert!(
                has_grad(&grads, *id, *rank),
                "{name}: no gradient for {path}"
            );
        }

        let maps = model.feature_maps(x.clone(), &[]).unwrap();
        assert!(maps.len() >= 2, "{name}");
        let last = maps.last().unwrap();
        assert_eq!(last.1.dims(), model.forward_features(x.clone()).dims());
        let e = model
            .feature_maps(x.clone(), &["nope".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains(&maps[0].0), "{e}");

        let m42 = model.with_classes(42, &device);
        assert_eq!(m42.forward(x).dims(), [2, 42]);
        assert_eq!(m42.num_classes(), 42);

        let text = toml::to_string(&cfg).unwrap();
        let back: ModelConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, cfg);
    }
}

/// Parameter counts at 1000 classes and 3 input channels, from torchvision 0.2x:
/// `sum(p.numel() for p in torchvision.models.<name>().parameters())`.
#[test]
fn parameter_counts_equal_torchvision() {
    let expected = [
        ("alexnet", 61_100_840),
        ("vgg11", 132_863_336),
        ("vgg13", 133_047_848),
        ("vgg16", 138_357_544),
        ("vgg19", 143_667_240),
        ("vgg11_bn", 132_868_840),
        ("vgg16_bn", 138_365_992),
        ("vgg19_bn", 143_678_248),
        ("googlenet_tv", 6_624_904),
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        // timm's resnet50d (deep stem + average-pool shortcuts), the "Bag of Tricks" ResNet-D.
        ("resnet50_d", 25_576_264),
    ];
    let device = Device::flex();
    for (name, want) in expected {
        let cfg = ModelConfig::for_model(ModelName::from_name(name).unwrap(), 1000, 3);
        let got = convlab::models::param_count(&cfg.build(&device).unwrap());
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn unknown_model_lists_known_names() {
    let e = ModelConfig::from_name("vgg9000").unwrap_err().to_string();
    for &n in ModelName::ALL {
        assert!(e.contains(n.as_str()), "{e}");
    }
}

#[test]
fn bench_vgg_matches_the_peer_network() {
    // 64-64-M-128-128-M-256-256-M with BN, GAP, linear to 10 on 3x32x32:
    // convs (no bias under BN): 9 * (3*64 + 64*64 + 64*128 + 128*128 + 128*256 + 256*256)
    //   = 1,144,512
    // BN (gamma, beta): 2*(64+64+128+128+256+256) = 1,792; linear 256*10 + 10 = 2,570.
    let cfg = ModelConfig::for_model(ModelName::BenchVgg, 10, 3);
    let m = cfg.build(&Device::flex()).unwrap();
    assert_eq!(convlab::models::param_count(&m), 1_144_512 + 1_792 + 2_570);
    // Burn's num_params also counts the BN running mean and variance (another 1,792).
    assert_eq!(m.num_params(), 1_144_512 + 1_792 + 2_570 + 1_792);
}

#[test]
fn zero_gamma_zeroes_the_last_bn_of_every_block() {
    let mut cfg = ModelConfig::for_model(ModelName::Resnet18Small, 10, 3);
    cfg.zero_gamma = true;
    let t = convlab::train::checkpoint::module_tensors(&cfg.build(&Device::flex()).unwrap());
    let last: Vec<_> = t
        .iter()
        .filter(|(k, _)| k.ends_with("convs.1.bn.gamma"))
        .collect();
    assert_eq!(last.len(), 8);
    assert!(last.iter().all(|(_, v)| v.data.iter().all(|&g| g == 0.0)));
    let first: Vec<_> = t
        .iter()
        .filter(|(k, _)| k.ends_with("convs.0.bn.gamma"))
        .collect();
    assert!(first.iter().all(|(_, v)| v.data.iter().all(|&g| g == 1.0)));
}

#[test]
fn alexnet_paper_grouping_and_init() {
    let cfg = ModelConfig::for_model(ModelName::AlexnetPaper, 1000, 3);
    let m = cfg.build(&Device::flex()).unwrap();
    // Grouped convs halve conv2/4/5's weights: conv1 3*96*121+96 = 34,944; conv2
    // 48*256*25+256 = 307,456; conv3 256*384*9+384 = 885,120; conv4 192*384*9+384 = 663,936;
    // conv5 192*256*9+256 = 442,624; fc6 9216*4096+4096 = 37,752,832; fc7 16,781,312;
    // fc8 4,097,000. Total 60,965,224 (the paper's "60 million parameters").
    assert_eq!(convlab::models::param_count(&m), 60_965_224);
    let t = convlab::train::checkpoint::module_tensors(&m);
    let all = |k: &str, v: f32| t[k].data.iter().all(|&x| x == v);
    for (k, v) in [
        ("AlexNet.convs.0.bias", 0.0),
        ("AlexNet.convs.1.bias", 1.0),
        ("AlexNet.convs.2.bias", 0.0),
        ("AlexNet.convs.3.bias", 1.0),
        ("AlexNet.convs.4.bias", 1.0),
        ("AlexNet.fc6.bias", 1.0),
        ("AlexNet.fc7.bias", 1.0),
        ("AlexNet.fc8.bias", 0.0),
    ] {
        assert!(all(k, v), "{k} should be all {v}");
    }
    let w = &t["AlexNet.fc6.weight"].data;
    let n = w.len() as f64;
    let mean = w.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(
        mean.abs() < 1e-4 && (std - 0.01).abs() < 2e-4,
        "mean {mean} std {std}"
    );
}

#[test]
fn init_schemes_build_every_small_model() {
    use convlab::models::Init;
    let device = Device::flex();
    for &name in ModelName::ALL.iter().filter(|n| n.is_small()) {
        for init in [Init::Default, Init::Xavier, Init::Kaiming, Init::Paper] {
            let mut cfg = ModelConfig::for_model(name, 10, 3);
            cfg.init = Some(init);
            let m = match cfg.build(&device) {
                Ok(m) => m,
                Err(e) => {
                    // Only families without a paper scheme may refuse, naming the field.
                    assert_eq!(init, Init::Paper, "{name}: {e}");
                    assert!(e.to_string().contains("model.init"), "{e}");
                    continue;
                }
            };
            let x = Tensor::<4>::ones([1, 3, 32, 32], &device);
            let y: Vec<f32> = m
                .forward(x)
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{name} {init:?}");
        }
    }
}

#[test]
fn init_from_copies_exactly_the_matching_tensors() {
    // VGG's shallow-to-deep initialisation, on narrow versions of A and D: only layers whose
    // tensors all agree in name and shape move (A's conv1 and its three FC layers; conv8's
    // bias has the same shape in both but its weight does not, so it stays), the rest stay.
    use convlab::train::checkpoint::{load_matching, module_tensors};
    let device = Device::flex();
    let mut a = ModelConfig::for_model(ModelName::Vgg11, 10, 3);
    a.plan = Some("8,M,16,M,32,32,M,64,64,M,64,64,M".into());
    let mut dd = ModelConfig::for_model(ModelName::Vgg16, 10, 3);
    dd.plan = Some("8,8,M,16,16,M,32,32,32,M,64,64,64,M,64,64,64,M".into());
    let src = module_tensors(&a.build(&device).unwrap());
    let deep = dd.build(&device).unwrap();
    let before = module_tensors(&deep);
    let (deep, copied) = load_matching(deep, &src);
    let after = module_tensors(&deep);
    let mut want: Vec<String> = [
        "Vgg.trunk.convs.0.conv.weight",
        "Vgg.trunk.convs.0.conv.bias",
        "Vgg.fc6.weight",
        "Vgg.fc6.bias",
        "Vgg.fc7.weight",
        "Vgg.fc7.bias",
        "Vgg.fc8.weight",
        "Vgg.fc8.bias",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut got = copied.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    for (k, t) in &after {
        if copied.contains(k) {
            assert_eq!(t, &src[k], "{k} not copied");
        } else {
            assert_eq!(t, &before[k], "{k} changed");
        }
    }
}
