//! The `convlab` command: parses the command line, picks the Burn device from the enabled
//! backends and `--device`, calls the library, and turns errors into one message and exit 1.

mod cli;

use clap::Parser;

fn main() {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`convlab models | head`); Rust ignores SIGPIPE by default and would panic on write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A write past a file-size limit (`ulimit -f`) would kill the process by SIGXFSZ in the
    // middle of a save; ignored, the write fails with EFBIG instead, and the run stops with
    // an error naming the file and keeps its last complete checkpoint, as on a full disk.
    #[cfg(unix)]
    // SAFETY: setting the disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Activation buffers are tens of MB; glibc serves blocks that large with a fresh mmap each
    // time, so every training step pays for page faults and the kernel zeroing the pages again
    // (16% of a bench-vgg inference pass, measured with perf). Keeping them on the heap, and not
    // handing freed memory back, lets the next step reuse the same pages.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: allocator tuning before any thread starts or any large block is allocated.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
