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
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
