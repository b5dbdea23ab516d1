//! Device choice: the one place that knows which backends were compiled in.

use anyhow::{Result, bail};
use burn::prelude::Device;

/// Sets the compute thread count (must run before any parallel work starts).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(n) = threads {
        if n == 0 || n > convlab::limits::MAX_THREADS {
            bail!(
                "--threads {n}: must be between 1 and {} (this machine has {} cores)",
                convlab::limits::MAX_THREADS,
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot set --threads {n}: {e}"))?;
    }
    Ok(())
}

/// The device `name` names, without autodiff.
pub fn pick(name: &str) -> Result<Device> {
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => (
            k,
            i.parse::<usize>()
                .map_err(|_| anyhow::anyhow!("--device {name}: `{i}` is not a device index"))?,
        ),
        None => (name, 0),
    };
    let _ = index;
    match kind {
        #[cfg(feature = "flex")]
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index)),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        // Burn 0.22 marks burn-tch deprecated; it stays here because it runs PyTorch's own
        // kernels, the fair peer for the CPU comparison (BENCHMARKS.md).
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        "tch" => Ok(Device::libtorch()),
        #[cfg(feature = "tch")]
        #[allow(deprecated)]
        "tch-cuda" => Ok(Device::libtorch_cuda(index)),
        _ => bail!(
            "--device {name}: unknown or not compiled in; this build has: {}",
            available().join(", ")
        ),
    }
}

/// The first backend this build has (for work that only needs some device, e.g. shapes).
pub fn first_available() -> Result<Device> {
    let first = available()
        .first()
        .map(|d| d.trim_end_matches("[:N]"))
        .ok_or_else(|| anyhow::anyhow!("this build has no backend; enable the `flex` feature"))?;
    pick(first)
}

fn available() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "flex") {
        v.extend(["cpu", "flex"]);
    }
    if cfg!(feature = "cuda") {
        v.push("cuda[:N]");
    }
    if cfg!(feature = "wgpu") {
        v.push("wgpu");
    }
    if cfg!(feature = "tch") {
        v.extend(["tch", "tch-cuda[:N]"]);
    }
    v
}

/// The precision a run's recipe asks for, as it can run on `dev`: fp32 with the reason on
/// stderr when bf16 cannot (`what` names the setting, e.g. `precision = "bf16"`).
pub fn precision(
    asked: convlab::kernels::Precision,
    dev: &Device,
    what: &str,
) -> convlab::kernels::Precision {
    convlab::kernels::supported_precision(asked, dev).unwrap_or_else(|why| {
        eprintln!("{what}: {why}");
        convlab::kernels::Precision::Fp32
    })
}
