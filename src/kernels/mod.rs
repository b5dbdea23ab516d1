//! Compute kernels convlab adds to Burn through its backend-extension mechanism.
//!
//! Model code stays backend-independent: it calls [`conv2d`], which takes the fast path when the
//! tensor lives on burn-flex (with or without autodiff) and the convolution is one the kernel
//! covers (f32, no groups, no dilation, symmetric padding), and Burn's own `conv2d` otherwise
//! (libtorch, CUDA, wgpu, and the cases the kernel does not cover).
//!
//! `CONVLAB_KERNELS=burn` in the environment turns the fast path off, for comparing the two
//! (`convlab bench` prints which one ran).

pub mod conv;
#[cfg(feature = "flex")]
mod flex;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use burn::tensor::DType;
use std::sync::OnceLock;

/// Which convolution implementation [`conv2d`] uses on burn-flex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// convlab's im2col + GEMM kernel ([`conv`]) with its own backward pass.
    Gemm,
    /// Burn's built-in convolution.
    Burn,
}

/// The kernel chosen for this process: `CONVLAB_KERNELS=burn` selects Burn's, anything else
/// (or nothing) convlab's.
pub fn conv_kernel() -> ConvKernel {
    static CHOICE: OnceLock<ConvKernel> = OnceLock::new();
    *CHOICE.get_or_init(|| match std::env::var("CONVLAB_KERNELS").as_deref() {
        Ok("burn") => ConvKernel::Burn,
        _ => ConvKernel::Gemm,
    })
}

/// Whether `x` is on a burn-flex device (directly or under autodiff).
fn on_flex(x: &Tensor<4>) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        let device = x.device();
        match device.as_dispatch() {
            DispatchDevice::Flex(_) => true,
            DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = x;
        false
    }
}

/// `conv.forward(x)`, on the fast kernel where it applies.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H_out, W_out]`.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    // Explicit is (top, left, bottom, right); `Same` goes to Burn, which works out its sides.
    let padding = match conv.padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(t, l, b, r) if t == b && l == r => Some([t, l]),
        _ => None,
    };
    let gemm_ok = conv_kernel() == ConvKernel::Gemm
        && conv.groups == 1
        && conv.dilation == [1, 1]
        && x.dtype() == DType::F32
        && on_flex(&x);
    match padding {
        Some(padding) if gemm_ok => gemm_conv2d(
            x,
            conv.weight.val(),
            conv.bias.as_ref().map(|b| b.val()),
            conv.stride,
            padding,
        ),
        _ => conv.forward(x),
    }
}

/// convlab's im2col + GEMM convolution on a burn-flex tensor, differentiable.
///
/// # Panics
/// On a tensor of any other backend.
#[cfg(feature = "flex")]
pub fn gemm_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::GemmConvBackend;
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as GemmConvBackend>::gemm_conv2d_bias(
            x,
            weight,
            b.into_dispatch(),
            stride,
            padding,
        ),
        None => <Dispatch as GemmConvBackend>::gemm_conv2d(x, weight, stride, padding),
    })
}

#[cfg(not(feature = "flex"))]
pub fn gemm_conv2d(
    _x: Tensor<4>,
    _weight: Tensor<4>,
    _bias: Option<Tensor<1>>,
    _stride: [usize; 2],
    _padding: [usize; 2],
) -> Tensor<4> {
    unreachable!("the GEMM convolution is only routed to on burn-flex")
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;

    fn max_rel_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    /// The GEMM kernel and Burn's convolution agree on the output and on all three gradients
    /// (the bar: within 1e-4 relative), for the padding/stride/kernel combinations the
    /// model families use.
    #[test]
    fn gemm_conv_matches_burn_forward_and_backward() {
        let device = Device::flex().autodiff();
        for (cin, cout, hw, k, s, p, bias) in [
            (3, 8, 9, 3, 1, 1, true),
            (4, 6, 12, 5, 2, 2, false),
            (3, 5, 23, 11, 4, 2, true),
            (6, 4, 7, 1, 1, 0, true),
            (5, 3, 8, 1, 2, 0, false),
            (2, 4, 10, 7, 2, 3, true),
        ] {
            let x = Tensor::<4>::random([3, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<4>::random([cout, cin, k, k], Distribution::Normal(0.0, 0.3), &device);
            let b = Tensor::<1>::random([cout], Distribution::Normal(0.0, 1.0), &device);
            let dy = Tensor::<4>::random(
                [3, cout, (hw + 2 * p - k) / s + 1, (hw + 2 * p - k) / s + 1],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let run = |fast: bool| {
                let (x, w, b) = (
                    x.clone().require_grad(),
                    w.clone().require_grad(),
                    b.clone().require_grad(),
                );
                let bias = bias.then(|| b.clone());
                let y = if fast {
                    gemm_conv2d(x.clone(), w.clone(), bias, [s, s], [p, p])
                } else {
                    burn_conv2d(
                        x.clone(),
                        w.clone(),
                        bias,
                        ConvOptions::new([s, s], [p, p], [1, 1], 1),
                    )
                };
                let grads = (y.clone() * dy.clone()).sum().backward();
                let gx = x.grad(&grads).unwrap();
                let gw = w.grad(&grads).unwrap();
                let gb = b.grad(&grads).map(|g| g.reshape([1, 1, 1, cout]));
                (y.inner(), gx, gw, gb)
            };
            let (y1, gx1, gw1, gb1) = run(true);
            let (y0, gx0, gw0, gb0) = run(false);
            let case = format!("cin {cin} cout {cout} {hw}px k{k} s{s} p{p} bias {bias}");
            assert!(max_rel_diff(y1, y0) < 1e-4, "{case}: output");
            assert!(max_rel_diff(gx1, gx0) < 1e-4, "{case}: input gradient");
            assert!(max_rel_diff(gw1, gw0) < 1e-4, "{case}: weight gradient");
            assert_eq!(gb1.is_some(), gb0.is_some(), "{case}");
            if let (Some(a), Some(b)) = (gb1, gb0) {
                assert!(max_rel_diff(a, b) < 1e-4, "{case}: bias gradient");
            }
        }
    }

    /// Without autodiff the same op runs on the plain backend.
    #[test]
    fn gemm_conv_runs_without_autodiff() {
        let device = Device::flex();
        let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        let y = gemm_conv2d(x.clone(), w.clone(), None, [1, 1], [1, 1]);
        let want = burn_conv2d(x, w, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
        assert!(max_rel_diff(y, want) < 1e-4);
    }
}
