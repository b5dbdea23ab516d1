//! The `convlab` command: parses the command line, picks the Burn device from the enabled
//! backends and `--device`, calls the library, and turns errors into one message and exit 1.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = cli::run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
