//! `weir-chaos`: the chaos suite. Starts agents (the debug `weir-agent`
//! build, see `scripts/chaos.sh`) and Redis on loopback, breaks them on
//! purpose, prints one table row per scenario and exits non-zero when any
//! scenario found the agent misbehaving. `weir-chaos NAME...` runs only the
//! scenarios whose names contain one of the words.

#![allow(clippy::print_stdout)] // the table is the program's output

use weir_e2e::chaos::{self, Row};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only: Vec<String> = std::env::args().skip(1).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|w| name.contains(w.as_str()));
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut rows: Vec<Row> = Vec::new();
    if wanted("connections") {
        rows.push(chaos::conns::run(dir.path()).await);
    }
    if wanted("killed") {
        rows.push(chaos::peers::killed_mid_stream(dir.path()).await);
    }
    if wanted("stopped") {
        rows.push(chaos::peers::stopped_peer(dir.path()).await);
    }
    if wanted("redis") {
        rows.push(chaos::redis::run(dir.path()).await);
    }
    if wanted("overload") {
        rows.push(chaos::overload::run(dir.path()).await);
    }
    print!("{}", chaos::table(&rows));
    if rows.iter().any(|r| !r.passed()) {
        std::process::exit(1);
    }
}
