//! The kernel plan: for one convolution's geometry and precision on one CPU, which algorithm
//! computes the forward pass, the input gradient and the weight (and bias) gradient. This is
//! the only place the choice is made: [`super::conv`] dispatches on [`plan`]'s answer;
//! [`super::winograd::fits`], [`super::direct::fits`] and [`super::nhwc::fits`] only say which
//! geometries each algorithm computes, and `tests/kernel_plan.rs` pins the choice for every convolution of
//! every registered model (at its default input size and at 128 and 224 px).
//!
//! The rules, each measured (the numbers are beside [`super::winograd::applies`],
//! [`super::direct::applies`] and [`super::conv::conv2d_backward`]):
//! - bf16 on AMX: 1x1 layers on [`super::pointwise`]: the forward pass and the input gradient
//!   up to 1024 input channels (for the input gradient, output channels), the weight
//!   gradient of every one; without AMX, on AVX512-BF16, the forward pass and the input
//!   gradient of 1x1 layers of up to 512 channels in, on maps of 196+ output positions, and
//!   the weight gradient on maps of 784+;
//! - bf16 on AMX: layers of fewer than 32 input channels on [`super::stem`] by phase planes
//!   (the forward pass; the weight gradient of stems of up to 4 channels); without AMX, on
//!   AVX512-BF16, the forward pass of stems of up to 4 channels and their weight gradient at
//!   stride 1 with 32+ output channels;
//! - bf16 on AMX: the channels-last implicit GEMM on the tiles ([`super::nhwc_amx`]) for
//!   the forward pass and the stride-1 input gradient of layers of more than one tap with
//!   whole tiles of channels on maps from 7 px (stride 2 from 14 outputs a row), and for the
//!   weight gradient of those layers;
//! - bf16 without AMX: the channels-last kernel ([`super::nhwc`]) for the forward pass and
//!   the stride-1 input gradient of layers with 1152+ products per output and at least two
//!   taps, in place of im2col, and of Winograd on maps up to 14 px; and its weight gradient
//!   in place of im2col's for every layer of more than one tap, and 1x1 stride-1 layers on
//!   maps from 28 px;
//! - forward: Winograd where it fits (F(4x4, 3x3) in f32 on maps from 16 px, else
//!   F(2x2, 3x3): [`winograd_tile`]), except layers of fewer than 64 input
//!   channels that the direct kernels take in bf16 or with AVX-512 tiles, and 512-channel
//!   layers on 6-7 px maps on AVX-512 (measured on AVX2 only); else the direct
//!   kernels where they fit and the CPU has AVX2 or AVX-512; else im2col + GEMM. In bf16 on
//!   a CPU with AMX the direct kernels never run (the tiles make the GEMM faster);
//! - input gradient: Winograd where the forward is Winograd, else direct where it fits with
//!   16+ input channels, else im2col;
//! - weight gradient: in fp32 through Winograd where the forward is Winograd (the same
//!   variant); else direct where it fits, unless Winograd runs the forward (bf16), else
//!   im2col.

use super::Precision;
use super::conv::ConvGeom;
use super::winograd::{self, Tile};
use super::{direct, nhwc};

/// A convolution algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// Winograd's F(2x2, 3x3) or F(4x4, 3x3) ([`super::winograd`]).
    Winograd(Tile),
    /// Register-tiled direct convolution ([`super::direct`]).
    Direct,
    /// im2col + GEMM ([`super::conv`]), any geometry.
    Im2col,
    /// The channels-last bf16 direct convolution ([`super::nhwc`]).
    ChannelsLast,
    /// 1x1 layers on the AMX tiles, the epilogue writing the output type
    /// ([`super::pointwise`]).
    Pointwise,
    /// Layers of few input channels (the RGB stems) on the AMX tiles by phase planes
    /// ([`super::stem`]).
    Stem,
}

impl Algo {
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Winograd(Tile::F2) => "winograd",
            Algo::Winograd(Tile::F4) => "winograd4",
            Algo::Direct => "direct",
            Algo::Im2col => "im2col",
            Algo::ChannelsLast => "nhwc",
            Algo::Pointwise => "pointwise",
            Algo::Stem => "stem",
        }
    }
}

/// Which algorithm computes each of a convolution's three products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub forward: Algo,
    pub input_grad: Algo,
    /// The weight gradient, and the bias gradient with it.
    pub weight_grad: Algo,
}

/// The register tiles the direct kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tiles {
    Avx512,
    Avx2,
    /// Neither: the direct kernels' portable loops are slower than im2col, so they never run.
    None,
}

/// What of the CPU the plan depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    pub tiles: Tiles,
    /// bf16 products run on the AMX tiles ([`super::amx::enabled`]).
    pub amx: bool,
}

impl Cpu {
    /// This CPU.
    pub fn detect() -> Cpu {
        let tiles = if direct::wide() {
            Tiles::Avx512
        } else if direct::available() {
            Tiles::Avx2
        } else {
            Tiles::None
        };
        Cpu {
            tiles,
            amx: super::amx::enabled(),
        }
    }
}

/// The algorithms for `g` (its `precision` included) on `cpu`.
pub fn plan(g: &ConvGeom, cpu: Cpu) -> ConvPlan {
    let fp32 = g.precision == Precision::Fp32;
    // On AMX the bf16 GEMM under im2col and Winograd outruns the direct kernels' VDPBF16PS
    // tiles even on a 3-channel stem (bench-vgg's 3->64 at 32 px, batch 64, 2 threads, Xeon
    // with AMX, `conv_layers 2 bf16 bench-vgg 32 64` with and without this rule: forward
    // 4.5-6.2 ms vs 6.5-8.4 ms, backward 2.6-3.0 vs 4.8-5.1 ms).
    let direct = cpu.tiles != Tiles::None && direct::fits(g) && (fp32 || !cpu.amx);
    // The 6-7 px maps [`winograd::fits`] admits for 512+ channels (numbers beside it, AVX2)
    // stay on im2col with AVX-512, timed there: Xeon family 6 model 207, fp32, 2 threads,
    // 2026-12-07, Winograd allowed against not (`bench/conv_layers_ab.sh OLD NEW 3 "7px
    // 3x3/1" fp32 MODEL 224 BATCH`, fastest ms forward / weight gradient / input gradient):
    // resnet18 at batch 32 27.9 / 26.5 / 28.7 (im2col in even groups) against 25.4 / 29.6 /
    // 27.4, even; resnet50 at batch 16 14.0 / 14.3 / 15.2 against 16.2 / 15.4 / 16.0, lost;
    // at 4 px (resnet18 at 128 px, batch 32) 9.0 / 10.9 / 10.3 against 12.0 / 12.1 / 12.3.
    let small_map = g.ho() < 8 || g.wo() < 8;
    let winograd = winograd::fits(g)
        && (g.cin >= 64 || !direct || (fp32 && cpu.tiles != Tiles::Avx512))
        && !(small_map && cpu.tiles == Tiles::Avx512);
    let forward = if pointwise(g, cpu) {
        Algo::Pointwise
    } else if stem(g, cpu) {
        Algo::Stem
    } else if channels_last(g, cpu, winograd, direct) {
        Algo::ChannelsLast
    } else if winograd {
        Algo::Winograd(winograd_tile(g))
    } else if direct {
        Algo::Direct
    } else {
        Algo::Im2col
    };
    let input_grad = if super::pointwise::input_grad_geom(g).is_some_and(|gi| pointwise(&gi, cpu)) {
        Algo::Pointwise
    } else if g.stride == [1, 1]
        && channels_last(&g.input_grad(), cpu, winograd, direct && g.cin >= 16)
    {
        Algo::ChannelsLast
    } else if g.precision == Precision::Bf16
        && cpu.amx
        && g.kh * g.kw > 1
        && super::nhwc_phases::fits_input_grad_strided(g)
    {
        // Strided layers by phases ([`super::nhwc_phases::input_grad_strided`]) against im2col
        // on the tiles (a GEMM then a scatter-add of the columns), resnet18 at 224 px, batch
        // 32, bf16, 2 threads, Xeon with AMX (family 6 model 207), 2026-12-05 20:20 UTC, two
        // alternated runs, fastest of 15 calls (`CONV_LAYERS_RUNS=15 CONV_LAYERS_ONLY=3x3/2
        // conv_layers 2 bf16 resnet18 224 32`, a loaded host), ms: 64 -> 128 at 56 px
        // 25.4 / 28.2 -> 13.5 / 14.4, 128 -> 256 16.8 / 16.8 -> 10.7 / 10.5, 256 -> 512
        // 14.3 / 15.7 -> 10.0 / 11.2.
        Algo::ChannelsLast
    } else if winograd {
        Algo::Winograd(winograd_tile(g))
    } else if direct && g.cin >= 16 {
        Algo::Direct
    } else {
        Algo::Im2col
    };
    let weight_grad = if g.precision == Precision::Bf16
        && (cpu.amx || (cpu.tiles == Tiles::Avx512 && g.p() >= 784))
        && super::pointwise::fits(g)
    {
        // Every 1x1 layer ([`super::pointwise::weight_grad`]) against the kernels it replaced
        // (im2col on the tiles for the widening and strided layers, the implicit GEMM for the
        // rest), bf16, 2 threads, Xeon with AMX (family 6 model 207), 2026-12-05, two
        // alternated runs (`CONV_LAYERS_ONLY=1x1 conv_layers 2 bf16 MODEL SIZE BATCH`), ms:
        // resnet50 at 224 px, batch 16: 64 -> 256 at 56 px 5.7-5.8 -> 1.5, 256 -> 64 3.9-4.1
        // -> 1.7, 256 -> 128 5.7-5.9 -> 3.2-3.3, 128 -> 512 at 28 px 3.2-3.3 -> 1.6, 512 -> 128
        // 2.9 -> 1.2-1.3, 256 -> 1024 at 14 px 1.8 -> 1.6, 1024 -> 256 2.5-2.7 -> 1.6-1.7,
        // 1024 -> 512 6.5-6.6 -> 3.5-3.8, 512 -> 2048 at 7 px 4.0-4.1 -> 2.6-2.7, 2048 -> 512
        // 4.7-4.9 -> 2.9-4.4; the 1x1/2 projections 256 -> 512 at 56 px 10.5-10.6 -> 4.7, 512
        // -> 1024 7.2-7.3 -> 3.9-4.1, but 1024 -> 2048 at 14 px 6.2-6.4 -> 6.6-6.9 (49 outputs
        // per image: one whole run of 32 positions and a copied tail); resnet18 at 224 px,
        // batch 32: 64 -> 128 /2 3.7-4.1 -> 1.1, 128 -> 256 2.1-2.3 -> 0.8, 256 -> 512
        // 1.6-1.7 -> 0.7-0.8. All of a resnet50 step's 1x1 weight gradients: 142 -> 81 ms.
        // Without AMX, on `VDPBF16PS` ([`super::bf16::wgrad_block32`]), maps of 784+
        // positions: against the channels-last kernel there (`CONVLAB_VDPBF16PS=on`, 2
        // threads, Xeon family 6 model 207 without AMX, 2026-12-07 20:50 UTC, three alternated
        // rounds, `bench/conv_layers_ab.sh OLD NEW 3 1x1 bf16 resnet50 224 16`, fastest ms):
        // 64 -> 256 at 56 px 20.0 -> 10.1, 64 -> 64 4.4 -> 2.7, 256 -> 64 13.8 -> 10.1, 256
        // -> 128 25.8 -> 20.1, the 256 -> 512 projection 26.8 -> 22.5; at 28 px 128 -> 512
        // 14.9 -> 10.2, 512 -> 128 12.2 -> 10.3, 512 -> 256 23.2 -> 20.3. Against im2col on
        // 196 positions and fewer (the last run of 32 positions mostly padding) it tied or
        // lost: the 512 -> 1024 projection at 28 px 23.8 -> 24.1, 256 -> 1024 at 14 px 10.3
        // -> 11.5, 1024 -> 512 21.0 -> 23.6, 2048 -> 512 at 7 px 11.5 -> 14.4.
        Algo::Pointwise
    } else if stem(g, cpu) && g.cin <= 4 && (cpu.amx || (g.stride == [1, 1] && g.cout >= 32)) {
        // The RGB stems only (numbers beside `stem`): on GoogLeNet's 16- and 24-channel 5x5
        // and 3x3 layers it lost or tied below 32 px maps. Without AMX the strided stems keep
        // the channels-last kernel (numbers beside `stem`).
        Algo::Stem
    } else if winograd && fp32 {
        // Through the forward's Winograd variant ([`winograd::weight_grad`]), against the
        // direct kernels (32 px and up) and im2col (below), fp32, 2 threads, Zen 4, fastest
        // of alternated runs (`bench/conv_layers_ab.sh OLD NEW 3 "px 3x3/1" fp32 MODEL SIZE
        // BATCH`), ms: resnet18 at 128 px, batch 32: 64 -> 64 32 px 12.2 -> 7.7, 128 -> 128
        // 16 px 13.5 -> 6.8, 256 -> 256 8 px (F(2x2)) 12.6 -> 8.4; resnet50 at 224 px, batch
        // 16: 56 px 17.9 -> 10.1, 28 px 18.1 -> 8.6, 14 px 17.2 -> 11.1; vgg16 at 224 px,
        // batch 8: 64 -> 64 224 px 183.8 -> 84.2, 256 -> 256 56 px 139.2 -> 58.8, 512 -> 512
        // 14 px 37.3 -> 28.6.
        Algo::Winograd(winograd_tile(g))
    } else if direct && (!winograd || (g.wo() >= 32 && fp32)) {
        Algo::Direct
    } else if fp32 && cpu.tiles == Tiles::Avx512 && direct::fits_strided_weight_grad(g) {
        // RGB stems by phase planes ([`direct::fits_strided_weight_grad`]). Against im2col's,
        // fp32, 2 threads, Zen 4 (`CONV_LAYERS_ONLY="3->" conv_layers 2 fp32 MODEL SIZE
        // BATCH`, ms): resnet18 at 128 px, batch 32, 42.9 -> 23.3; at 224 px 75.6 -> 68.0;
        // alexnet 224 px 59.1 -> 53.8; alexnet_small 32 px, batch 64, 3.6 -> 1.8. With the
        // AVX2 kernel (forced on the same CPU) it won at 128 px (41.3 -> 29.6) but lost at
        // 224 px (74.2 -> 81.4; alexnet 54.3 -> 80.6), so AVX2 keeps im2col.
        Algo::Direct
    } else if g.precision == Precision::Bf16
        && cpu.amx
        && nhwc::fits_weight_grad(g)
        && super::nhwc_amx::fits_weight_grad(g)
        && g.wo() >= 7
        && (g.stride == [1, 1] || g.wo() >= 14)
        && g.kh * g.kw > 1
    {
        // On AMX ([`super::nhwc_amx::weight_grad`]) against im2col on the tiles, bf16,
        // 2 threads, Xeon with AMX (family 6 model 207), 2026-12-05, fastest of two alternated
        // runs (`bench/conv_layers_ab.sh OLD NEW 2 "->" bf16 MODEL SIZE BATCH`), ms: resnet18
        // at 224 px, batch 32: 64 -> 64 at 56 px 24.1 -> 9.0, 128 -> 128 at 28 px 12.6 ->
        // 6.8, 256 -> 256 at 14 px 11.9 -> 8.0, 512 -> 512 at 7 px 12.6 -> 12.2; bench-vgg at
        // 32 px, batch 64: 64 -> 64 at 32 px 11.1 -> 4.9, 128 -> 128 at 16 px 8.0 -> 5.7.
        // (resnet50's 1x1 layers ran here too, until the pointwise kernel above.) Strided
        // layers by phase planes from 14 outputs a row (the
        // same runs, minimum of two or three): resnet18's 64 -> 128 at 56 px 13.9 -> 9.8, 128
        // -> 256 at 28 px 10.7 -> 7.4; resnet50's 128 -> 128 at 56 px 12.2 -> 10.9, 256 -> 256
        // at 28 px 10.7 -> 9.6; at 7 outputs a row even or worse (resnet18's 256 -> 512 11.0
        // -> 10.7, resnet50's 512 -> 512 11.7 -> 12.3).
        Algo::ChannelsLast
    } else if bf16_tiles(g, cpu)
        && nhwc::fits_weight_grad(g)
        && (g.kh * g.kw > 1 || (g.stride == [1, 1] && g.wo() >= 28))
    {
        // Measured against im2col's (Zen 4, 2 threads, two alternated runs each, ms):
        // resnet18 at 224 px, batch 32 (`conv_layers 2 bf16 resnet18 224 32`): 64 -> 64 at
        // 56 px 29.3-29.5 -> 24.2-24.7, 128 -> 128 at 28 px 22.9-23.5 -> 21.4-22.4; vgg16 at
        // 224 px, batch 8: 64 -> 64 at 224 px 117-124 -> 112-113, 128 -> 128 at 112 px
        // 93-96 -> 80-85, 256 -> 256 at 56 px 80-81 -> 75-78, 512 -> 512 at 28 px 81-82 ->
        // 77. Below 28 px it lost until its position pairs stopped running over the padded
        // columns (2026-12-04, fastest of 2-3 alternated runs, `bench/conv_layers_ab.sh`):
        // resnet18 at 128 px 128 -> 128 16 px 8.4 -> 6.3, 256 -> 256 8 px 9.5 -> 7.4,
        // 512 -> 512 4 px 12.7 -> 10.6; at 224 px 256 -> 256 14 px 23.1 -> 20.2, 512 -> 512
        // 7 px 29.9 -> 27.3; vgg16's 512 -> 512 14 px 27.2 -> 19.8. Strided 3x3 then won
        // too, except one: resnet18 at 128 px 64 -> 128 5.2 -> 4.6, 128 -> 256 4.5 -> 4.1,
        // 256 -> 512 5.2 -> 4.2; at 224 px 15.6 -> 14.3, 12.6 -> 12.3, but 256 -> 512 at 14 px
        // 13.4 -> 14.0. The RGB stems: resnet18's 7x7/2 57-66 -> 39-40 ms at 224 px and
        // 19-20 -> 13.5-13.7 at 128 px, alexnet's 11x11/4 42 -> 20.5-20.8 at 224 px, batch
        // 32. The 1x1 layers only from 28 px and stride 1: the 1x1/2 projections were slower
        // (4.5-5.3 -> 9.5-10.5 at 56 px), and so were resnet50's 1x1/1 below 28 px after the
        // change above (256 -> 1024 at 14 px 5.1 -> 7.6, 512 -> 2048 at 7 px 5.6 -> 9.9).
        Algo::ChannelsLast
    } else {
        Algo::Im2col
    };
    ConvPlan {
        forward,
        input_grad,
        weight_grad,
    }
}

/// Which Winograd variant a layer that runs Winograd uses ([`Tile`]): F(4x4, 3x3) in f32 on
/// outputs of 16 px and more, F(2x2, 3x3) otherwise (bf16 always, for its rounding error:
/// the numbers are beside [`Tile`]).
///
/// Below 16 px F(4x4, 3x3) has so few tiles per plane (4 at 8 px) that its transforms'
/// per-plane work outweighs the smaller GEMMs. resnet18 at 128 px, batch 32, 2 threads, f32,
/// Zen 4, fastest of 5 alternated runs (`bench/conv_layers_ab.sh OLD NEW 5 "px 3x3/1" fp32
/// resnet18 128 32`), forward / input gradient ms, F(2x2) -> F(4x4): 64 -> 64 at 32 px
/// 8.9 / 8.3 -> 6.6 / 6.6, 128 -> 128 at 16 px 7.1 / 7.7 -> 7.0 / 6.7, 256 -> 256 at 8 px
/// 7.7 / 8.1 -> 9.1 / 9.5; resnet50 at 224 px, batch 16 (3 runs): 64 -> 64 at 56 px
/// 14.7 / 12.8 -> 11.7 / 8.8, 128 -> 128 at 28 px 11.0 / 11.3 -> 9.0 / 9.0, and 256 -> 256
/// at 14 px 13.8 / 14.4 -> 15.4 / 15.9 (4 runs; 16 tiles a plane, the last row and column
/// of tiles half empty).
fn winograd_tile(g: &ConvGeom) -> Tile {
    if g.precision == Precision::Fp32 && g.ho() >= 16 && g.wo() >= 16 {
        Tile::F4
    } else {
        Tile::F2
    }
}

/// Whether [`super::pointwise`] computes `g` (a forward convolution, or the one that gives a
/// 1x1 layer's input gradient, [`super::pointwise::input_grad_geom`]): bf16 on AMX, 1x1
/// layers with whole tiles of channels and at most 1024 products per output.
///
/// Against im2col on the tiles (whose f32 output the caller rounded), bf16 activations in and
/// out, 2 threads, Xeon with AMX (family 6 model 207), 2026-12-05, the rule off and on in
/// alternated runs (`CONV_LAYERS_ONLY=1x1 cargo run --release --example conv_layers 2 bf16
/// resnet50 224 16`; one pair at 56 and 28 px, the fastest of three at 14 and 7 px), forward
/// / input gradient ms: 64 -> 256 at 56 px 11.9 / 7.1 -> 2.4 / 2.4, 256 -> 64
/// 6.0 / 13.4 -> 2.4 / 2.5, 256 -> 128 11.3 / 13.9 -> 2.9 / 3.3; at 28 px 128 -> 512 5.1 /
/// 2.7 -> 2.0 / 1.8, 512 -> 128 2.5 / 7.3 -> 1.8 / 1.6; at 14 px 256 -> 1024 3.4 / 2.6 -> 1.6
/// / 2.0, 1024 -> 256 2.9 / 3.5 -> 1.5 / 1.5, 1024 -> 512 5.1 / 5.5 -> 2.9 / 3.9; the 1x1/2
/// projection 256 -> 512 forward 12.6 -> 5.1. Their input gradient (the sampled positions
/// scattered into zeros, against im2col + col2im; `bench/conv_layers_ab.sh OLD NEW 3 1x1/2
/// bf16 MODEL SIZE BATCH`): resnet50's 256 -> 512 at 56 px 7.2 -> 3.5, 512 -> 1024 at 28 px
/// 5.3 -> 4.2; resnet18's (batch 32) 64 -> 128 at 56 px 2.4 -> 0.9, 128 -> 256 1.4 -> 0.6,
/// 256 -> 512 1.1 -> 0.7. With 2048 products per output it lost or tied: the input gradient
/// of 512 -> 2048 at 7 px 2.9 -> 4.7, the forward of 2048 -> 512 2.2 -> 2.5 (both operands of
/// a 32 x 32 block, 128 KiB each, stream from L2 for 49 positions).
///
/// On AVX512-BF16 without AMX (the blocks on `VDPBF16PS`, [`super::bf16::block32`]): layers of
/// up to 512 input channels with at least 196 output positions (14 x 14). Against im2col on
/// the bf16 GEMM, `CONVLAB_VDPBF16PS=on`, 2 threads, Xeon family 6 model 207 without AMX,
/// 2026-12-07 about 20:15 UTC, the rule off and on in three alternated rounds
/// (`bench/conv_layers_ab.sh OLD NEW 3 1x1 bf16 resnet50 224 16`), fastest forward / input
/// gradient ms: 64 -> 256 at 56 px 17.3 / 13.6 -> 11.4 / 11.0, 64 -> 64 4.1 / 3.9 -> 2.9 /
/// 2.8, 256 -> 64 15.0 / 15.8 -> 11.1 / 10.8, 256 -> 128 25.6 / 27.1 -> 20.7 / 20.7, the 1x1/2
/// projection 256 -> 512 26.6 / 28.3 -> 23.9 / 23.1; at 28 px 128 -> 512 13.1 / 12.0 -> 11.9
/// / 11.8, 512 -> 128 11.7 / 13.6 -> 10.5 / 10.6, 512 -> 256 22.1 / 24.0 -> 20.6 / 20.9, the
/// projection 512 -> 1024 forward 30.3 -> 23.4; at 14 px 256 -> 1024 forward 13.1 -> 11.4;
/// resnet18 (batch 32) 64 -> 128 /2 at 56 px 5.1 / 5.8 -> 3.8 / 3.8, 128 -> 256 /2 3.8 / 4.4
/// -> 3.3 / 3.6. It lost where an image has 49 positions (a second panel of 32 mostly padding,
/// where im2col's GEMM spans images): 512 -> 2048 at 7 px 12.3 / 12.2 -> 14.3 / 15.6, 2048 ->
/// 512 11.9 / 13.7 -> 13.4 / 15.4, the 1024 -> 2048 projection 24.7 / 26.0 -> 27.7 / 32.5;
/// and tied or lost from 1024 products per output at 14 px (1024 -> 256 forward 11.8 ->
/// 11.4, 1024 -> 512 23.0 -> 23.3, the input gradient of 256 -> 1024 11.2 -> 12.1). The rule
/// still takes one layer that lost: the input gradient of 1024 -> 512 at 14 px (512 products,
/// 196 positions, 22.9 -> 24.2), where 256 -> 1024's forward (256 products) won.
fn pointwise(g: &ConvGeom, cpu: Cpu) -> bool {
    g.precision == Precision::Bf16
        && super::pointwise::fits(g)
        && if cpu.amx {
            g.cin <= 1024
        } else {
            cpu.tiles == Tiles::Avx512 && g.cin <= 512 && g.p() >= 196
        }
}

/// Whether [`super::stem`] computes `g` (forward and weight gradient): bf16 on AMX, layers of
/// fewer than 32 input channels that [`super::stem::fits`].
///
/// Against im2col on the tiles, bf16, 2 threads, Xeon with AMX (family 6 model 207),
/// 2026-12-05, fastest of two alternated runs (`CONV_LAYERS_ONLY="3->" conv_layers 2 bf16 MODEL
/// SIZE BATCH`), forward / weight gradient ms: resnet18's 7x7/2 at 224 px, batch 32, 34.6 /
/// 46.2-52.7 -> 12.5 / 18.1-20.5; at 128 px 10.2 / 15.7 -> 3.9 / 5.7; alexnet's 11x11/4 at
/// 224 px, batch 32, 27.4 / 32.0-39.2 -> 6.5 / 7.9-9.5; vgg16's 3x3/1 at 224 px, batch 8, 21.7
/// / 11.5-12.1 -> 3.4 / 8.5 (13.4 before its weight gradient was summed per chunk of images);
/// bench-vgg's at 32 px, batch 64, 2.1 / 1.3-1.4 -> 0.8 / 0.7. GoogLeNet's layers of 16 and 24
/// input channels (224 px, batch 32; `googlenet_small` at 32 px, batch 64), forward: 16 -> 32
/// 5x5 at 28 px 2.5 -> 1.0, 16 -> 48 5x5 at 14 px 0.9 -> 0.3, 24 -> 64 5x5 1.3 -> 0.7;
/// 16 -> 48 3x3 at 32 px 3.0 -> 1.2-1.3, 24 -> 32 at 16 px 0.9 -> 0.4. Their weight gradient
/// lost or tied (16 -> 32 5x5 1.4 -> 1.6, 24 -> 32 at 16 px 0.6 -> 0.9, only 16 -> 48 at 32 px
/// won, 2.2-2.3 -> 1.7-2.0), so it runs here for stems of up to 4 channels only.
///
/// Without AMX, on `VDPBF16PS` ([`super::bf16::block32`]), the stems of up to 4 channels: against
/// im2col (forward) and the channels-last kernel (weight gradient), `CONVLAB_VDPBF16PS=on`, 2
/// threads, Xeon family 6 model 207 without AMX, 2026-12-07 21:47 UTC, three alternated rounds
/// (`bench/conv_layers_ab.sh OLD NEW 3 "3->" bf16 MODEL SIZE BATCH`), fastest forward / weight
/// gradient ms: resnet50's 7x7/2 at 224 px, batch 16, 40.0 / 30.4 -> 28.2 / 36.3; resnet18's
/// at 128 px, batch 32, 27.7 / 19.6 -> 18.8 / 22.2; alexnet's 11x11/4 at 224 px, batch 32,
/// 57.6 / 32.1 -> 32.8 / 34.5; vgg16's 3x3/1 at 224 px, batch 8, 32.5 / 26.4 -> 13.2 / 18.4;
/// at 32 px, batch 64 (five calls a round, 21:54 UTC), bench-vgg's 3 -> 64 4.2 / 3.1 -> 2.1 /
/// 2.2, resnet18_small's 3 -> 16 1.1 / 0.8 -> 0.6 / 1.0 (16-row blocks). So the forward pass of
/// every such stem, and the weight gradient at stride 1 of 32+ output channels.
fn stem(g: &ConvGeom, cpu: Cpu) -> bool {
    g.precision == Precision::Bf16
        && super::stem::fits(g)
        && (cpu.amx || (cpu.tiles == Tiles::Avx512 && g.cin <= 4))
}

/// bf16 on AVX512-BF16 without AMX: where [`super::nhwc`]'s kernels were measured.
fn bf16_tiles(g: &ConvGeom, cpu: Cpu) -> bool {
    g.precision == Precision::Bf16 && !cpu.amx && cpu.tiles == Tiles::Avx512
}

/// Whether the channels-last bf16 kernel computes `g` (a forward convolution, or the one that
/// gives a stride-1 layer's input gradient): bf16 on AVX512-BF16 without AMX, at least two
/// taps and 1152 products per output (`C_in·kh·kw`, 128 channels of a 3x3), and a map no
/// wider than 14 px where Winograd would run; never in place of the direct kernels (not
/// measured against them). Measured against the algorithm it replaces
/// (resnet18 at 224 and 128 px, batch 32, 2 threads, Zen 4, `conv_layers 2 bf16 resnet18 224
/// 32`, two alternated runs, forward ms): 512 -> 512 at 7 px 28.8-29.2 -> 19.7-19.8 (im2col),
/// 256 -> 256 at 14 px 24.9 -> 18.7-19.4 (Winograd), 256 -> 512 stride 2 at 14 px 15.5-16.0
/// -> 10.7-11.0, 128 -> 256 stride 2 at 28 px 12.1-12.6 -> 11.2-11.5, 512 -> 512 at 4 px 9.7
/// -> 8.0. It lost where it is not used: 64-channel inputs (64 -> 128 stride 2 at 32 px, 4.9
/// -> 6.4: too few products per output for its per-tile stores), 1x1 layers (2.2 -> 6.7 ms
/// at 56 px: the whole image is copied for one tap) and Winograd's 28-56 px maps (128 ->
/// 128 at 28 px 13.7-15.1 -> 19.6); at 8 px the two were within the VM's noise (5.2-8.3 vs
/// 6.4-7.2). RGB stems, their third channel paired with a zero, lost too (2026-12-04,
/// resnet18's 7x7/2 at 128 px 10.5 -> 25.5 ms, at 224 px 33.6 -> 41.2): 147 products per
/// output do not pay for a tile's 384 scattered NCHW stores.
fn channels_last(g: &ConvGeom, cpu: Cpu, winograd: bool, direct: bool) -> bool {
    // On AMX the implicit GEMM of [`super::nhwc_amx`], against Winograd F(2x2, 3x3) and
    // im2col on the tiles, bf16, 2 threads, Xeon with AMX (family 6 model 207), 2026-12-05,
    // fastest of two alternated runs (`bench/conv_layers_ab.sh OLD NEW 2 "->" bf16 MODEL SIZE
    // BATCH`), forward / input gradient ms: resnet18 at 224 px, batch 32: 64 -> 64 at 56 px
    // 15.3 / 14.9 -> 8.2 / 7.6, 128 -> 128 at 28 px 8.7 / 8.7 -> 5.1 / 4.8, 256 -> 256 at
    // 14 px 9.2 / 9.4 -> 4.2 / 5.0, 512 -> 512 at 7 px 10.6 / 15.4 -> 6.2 / 7.5; strided
    // 3x3 (forward only) 64 -> 128 at 56 px 8.3 -> 4.2, 128 -> 256 7.1 -> 4.4, but 256 -> 512
    // at 14 px 8.0 -> 8.2 (7 outputs a row: a block of 32 rows computes 7) and resnet50's
    // 512 -> 512 at 14 px 6.5 -> 11.2, until such layers ran on phase planes (numbers in
    // [`nhwc::forward_rounded`]: 256 -> 512 6.7-7.8 -> 3.4-3.9, 512 -> 512 6.1-6.5 ->
    // 4.5-4.7); the 1x1 layers lost (64 -> 64 at 56 px 0.9 -> 2.2,
    // 256 -> 64 2.9 -> 5.8: a whole copy of the image for one tap), and so did 4 px maps
    // (resnet18 at 128 px, 512 -> 512: forward 3.8 -> 4.9, weight gradient 5.7 -> 6.5, input
    // gradient 6.4 -> 5.7; a block of 32 grid positions holds 16 outputs there).
    if g.precision == Precision::Bf16 && cpu.amx {
        return nhwc::fits(g) && super::nhwc_amx::fits(g) && g.kh * g.kw > 1 && g.wo() >= 7;
    }
    bf16_tiles(g, cpu)
        && nhwc::fits(g)
        && g.kh * g.kw > 1
        && g.k() >= 1152
        && if winograd { g.wo() <= 14 } else { !direct }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geom(cin: usize, cout: usize, side: usize, k: usize, stride: usize) -> ConvGeom {
        ConvGeom {
            batch: 1,
            cin,
            h: side,
            w: side,
            cout,
            kh: k,
            kw: k,
            stride: [stride, stride],
            pad: [k / 2, k / 2],
            precision: Precision::Fp32,
        }
    }

    const AVX512: Cpu = Cpu {
        tiles: Tiles::Avx512,
        amx: false,
    };
    const AMX: Cpu = Cpu {
        tiles: Tiles::Avx512,
        amx: true,
    };
    const AVX2: Cpu = Cpu {
        tiles: Tiles::Avx2,
        amx: false,
    };
    const PLAIN: Cpu = Cpu {
        tiles: Tiles::None,
        amx: false,
    };

    fn p(f: Algo, dx: Algo, dw: Algo) -> ConvPlan {
        ConvPlan {
            forward: f,
            input_grad: dx,
            weight_grad: dw,
        }
    }

    use Algo::{ChannelsLast as C, Direct as D, Im2col as I, Pointwise as PW, Stem as ST};
    /// Winograd F(2x2, 3x3) and F(4x4, 3x3).
    const W: Algo = Algo::Winograd(Tile::F2);
    const W4: Algo = Algo::Winograd(Tile::F4);

    fn b16(g: ConvGeom) -> ConvGeom {
        ConvGeom {
            precision: Precision::Bf16,
            ..g
        }
    }

    #[test]
    fn the_rules_on_typical_layers() {
        // Wide 3x3 layers: Winograd for all three products in fp32 (F(4x4, 3x3) from 16 px,
        // F(2x2, 3x3) below).
        assert_eq!(plan(&geom(64, 64, 56, 3, 1), AVX512), p(W4, W4, W4));
        assert_eq!(plan(&geom(128, 128, 16, 3, 1), AVX512), p(W4, W4, W4));
        assert_eq!(plan(&geom(256, 256, 14, 3, 1), AVX512), p(W, W, W));
        // 32 -> 32: the AVX-512 direct tiles win; the AVX2 ones keep Winograd in fp32.
        assert_eq!(plan(&geom(32, 32, 16, 3, 1), AVX512), p(D, D, D));
        assert_eq!(plan(&geom(32, 32, 16, 3, 1), AVX2), p(W4, W4, W4));
        let bf16 = ConvGeom {
            precision: Precision::Bf16,
            ..geom(32, 32, 16, 3, 1)
        };
        assert_eq!(plan(&bf16, AVX2), p(D, D, D));
        // On AMX, bf16 leaves the direct kernels for the tiles' implicit GEMM; fp32 keeps them.
        assert_eq!(plan(&bf16, AMX), p(C, C, C));
        assert_eq!(plan(&geom(32, 32, 16, 3, 1), AMX), p(D, D, D));
        // RGB stem: direct forward and weight gradient, the input gradient (never needed
        // there) from im2col.
        assert_eq!(plan(&geom(3, 64, 32, 3, 1), AVX512), p(D, I, D));
        // Stride 2 and 1x1: im2col for everything.
        assert_eq!(plan(&geom(64, 128, 56, 3, 2), AVX512), p(I, I, I));
        assert_eq!(plan(&geom(64, 256, 56, 1, 1), AVX512), p(I, I, I));
        // ... except an RGB stem's fp32 weight gradient, by phase planes on the AVX-512
        // direct kernel (AVX2 keeps im2col).
        assert_eq!(plan(&geom(3, 64, 224, 7, 2), AVX512), p(I, I, D));
        assert_eq!(plan(&geom(3, 64, 224, 7, 2), AVX2), p(I, I, I));
        // On AMX the bf16 stems run on the stem kernel (its input gradient, never needed, on
        // im2col).
        assert_eq!(plan(&b16(geom(3, 64, 224, 7, 2)), AMX), p(ST, I, ST));
        assert_eq!(plan(&b16(geom(3, 64, 224, 3, 1)), AMX), p(ST, I, ST));
        // bf16 on AVX512-BF16 without AMX: the channels-last kernel for 3x3 layers of 128+
        // input channels on maps up to 14 px and for their stride-2 layers (forward; the
        // input gradient where the stride is 1); not for 1x1 layers, 64-channel inputs,
        // Winograd's wider maps, or on AMX.
        let b = |g: ConvGeom| ConvGeom {
            precision: Precision::Bf16,
            ..g
        };
        assert_eq!(plan(&b(geom(512, 512, 7, 3, 1)), AVX512), p(C, C, C));
        assert_eq!(plan(&b(geom(256, 256, 14, 3, 1)), AVX512), p(C, C, C));
        assert_eq!(plan(&b(geom(128, 256, 28, 3, 2)), AVX512), p(C, I, C));
        // Its weight gradient for every layer of more than one tap (any map, any stride, the
        // strided RGB stems too), and for 1x1 layers from 28 px maps up at stride 1.
        assert_eq!(plan(&b(geom(128, 128, 28, 3, 1)), AVX512), p(W, W, C));
        assert_eq!(plan(&b(geom(64, 64, 56, 3, 1)), AVX512), p(W, W, C));
        // The RGB stems' forward pass on the stem kernel's `VDPBF16PS` blocks, and at stride 1
        // their weight gradient too.
        assert_eq!(plan(&b(geom(3, 64, 224, 7, 2)), AVX512), p(ST, I, C));
        assert_eq!(plan(&b(geom(3, 64, 224, 3, 1)), AVX512), p(ST, I, ST));
        assert_eq!(plan(&b(geom(64, 128, 56, 3, 2)), AVX512), p(I, I, C));
        // 1x1 layers on the pointwise kernel's `VDPBF16PS` blocks, forward and input gradient
        // up to 512 channels in (for the input gradient, out) on 196+ positions, the weight
        // gradient on 784+.
        assert_eq!(plan(&b(geom(64, 256, 56, 1, 1)), AVX512), p(PW, PW, PW));
        assert_eq!(plan(&b(geom(256, 1024, 56, 1, 1)), AVX512), p(PW, I, PW));
        assert_eq!(plan(&b(geom(128, 512, 28, 1, 1)), AVX512), p(PW, PW, PW));
        assert_eq!(plan(&b(geom(1024, 256, 14, 1, 1)), AVX512), p(I, PW, I));
        assert_eq!(plan(&b(geom(512, 1024, 28, 1, 2)), AVX512), p(PW, I, I));
        assert_eq!(plan(&b(geom(256, 512, 14, 1, 2)), AVX512), p(I, I, I));
        assert_eq!(plan(&b(geom(512, 2048, 7, 1, 1)), AVX512), p(I, I, I));
        // In fp32, never.
        assert_eq!(plan(&geom(64, 256, 56, 1, 1), AVX512), p(I, I, I));
        // On AMX: the tiles' implicit GEMM for 3x3 layers of whole tiles of channels (stride 2
        // too: the forward pass on phase planes, the input gradient by phases); 1x1 layers on the pointwise kernel (input
        // gradient too, up to 1024 products per output; the weight gradient of every one).
        assert_eq!(plan(&b(geom(512, 512, 7, 3, 1)), AMX), p(C, C, C));
        assert_eq!(plan(&b(geom(512, 512, 4, 3, 1)), AMX), p(I, I, I));
        assert_eq!(plan(&b(geom(64, 128, 56, 3, 2)), AMX), p(C, C, C));
        assert_eq!(plan(&b(geom(256, 512, 14, 3, 2)), AMX), p(C, C, I));
        assert_eq!(plan(&b(geom(64, 128, 56, 1, 2)), AMX), p(PW, PW, PW));
        assert_eq!(plan(&b(geom(256, 64, 56, 1, 1)), AMX), p(PW, PW, PW));
        assert_eq!(plan(&b(geom(64, 256, 56, 1, 1)), AMX), p(PW, PW, PW));
        assert_eq!(plan(&b(geom(2048, 512, 7, 1, 1)), AMX), p(I, PW, PW));
        assert_eq!(plan(&b(geom(512, 2048, 7, 1, 1)), AMX), p(PW, I, PW));
        // A 1x1 layer of 16 input channels: half a tile of `K`, so im2col forward.
        assert_eq!(plan(&b(geom(16, 64, 28, 1, 1)), AMX), p(I, PW, I));
        // 16 input channels are half a tile: the stem kernel forward; the input gradient
        // reads 64 on the implicit GEMM.
        assert_eq!(plan(&b(geom(16, 64, 56, 3, 1)), AMX), p(ST, C, I));
        // Without AVX2 the direct kernels never run.
        assert_eq!(plan(&geom(16, 16, 32, 3, 1), PLAIN), p(I, I, I));
        assert_eq!(plan(&geom(64, 64, 56, 3, 1), PLAIN), p(W4, W4, W4));
    }
}
