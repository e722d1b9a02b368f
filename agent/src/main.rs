//! `weir-agent`: the node agent. It runs the inference engine and serves the
//! OpenAI API; the `serve` command lands with the engine and server work.

use clap::Parser;

/// Command line of the node agent.
#[derive(Parser, Debug)]
#[command(name = "weir-agent", version, about = "The Weir node agent")]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    eprintln!(
        "weir-agent {}: no command yet; run with --help",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
