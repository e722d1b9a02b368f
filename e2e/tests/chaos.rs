//! The chaos suite (`scripts/chaos.sh`) as a test: every scenario must
//! find the agent holding up. It runs alone (see `.config/nextest.toml`)
//! because its bounds are on latency.

#![allow(clippy::print_stdout)] // the table is the test's report

use weir_e2e::chaos;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_hold_up_under_chaos() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        chaos::conns::run(dir.path()).await,
        chaos::peers::killed_mid_stream(dir.path()).await,
        chaos::peers::stopped_peer(dir.path()).await,
        chaos::redis::run(dir.path()).await,
        chaos::overload::run(dir.path()).await,
    ];
    let table = chaos::table(&rows);
    println!("{table}");
    assert!(rows.iter().all(chaos::Row::passed), "{table}");
}
