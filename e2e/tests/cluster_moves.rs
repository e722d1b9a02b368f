//! Cluster suite, moves under load (runs when `KUBECONFIG` names a cluster;
//! skips otherwise): taking replicas away from agents that serve a steady
//! stream of chats, streaming and not, loses no request.
//!
//! - A drain (`weir.dev/drain` on a NodeAgent) makes before it breaks: the
//!   replacement goes to the free Node and reports Ready while the drained
//!   NodeAgent still holds its entry; then the entry goes, the NodeAgent
//!   says `Drained=True` with a `Drained` event, and nothing failed.
//! - A rolling restart of every agent (SIGTERM, wait for exit 0, start it
//!   again for the same Node, one at a time, each time until the Model is
//!   back to two Ready replicas) fails nothing, with clients steered by
//!   readiness as a Service steers them.
//! - A Model deleted under long streams: its agent reports it `Unloading`
//!   while every stream in flight runs to `data: [DONE]` without an error
//!   event, then reports it no more.

#[allow(dead_code)] // each suite binary uses its own part of the harness
mod cluster_support;

use std::time::{Duration, Instant};

use cluster_support::traffic::{Load, Steering, Traffic};
use cluster_support::{Cluster, chat, until, within_every};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use weir_crds::node_agent::ModelPhase;
use weir_crds::{Model, NodeAgent};
use weir_engine::testmodel::TinyModelSpec;

/// Whether `agent`'s spec holds an entry for `model`.
fn assigned(agent: &NodeAgent, model: &str) -> bool {
    agent.spec.models.iter().any(|m| m.served_name == model)
}

/// The phase `agent` reports for `model`, if it reports it.
fn phase(agent: &NodeAgent, model: &str) -> Option<ModelPhase> {
    let status = agent.status.as_ref()?;
    let m = status.models.iter().find(|m| m.served_name == model)?;
    Some(m.phase)
}

/// The status of `agent`'s condition `type_`, with its reason.
fn condition(agent: &NodeAgent, type_: &str) -> Option<(String, String)> {
    let status = agent.status.as_ref()?;
    let c = status.common.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

/// Two replicas of a tiny model named after the test, ready, and every
/// agent answering it; the Model's name and the Nodes of its replicas.
async fn two_replicas(cluster: &Cluster, prefix: &str) -> (String, Vec<String>) {
    let uri = cluster.tiny("tiny", &TinyModelSpec::llama());
    let name = format!("{prefix}-{}", cluster.tag);
    let two = json!({"min": 2, "max": 2});
    cluster
        .model(&name, json!({"source": {"uri": uri}, "replicas": two}))
        .await;
    let placed = cluster.ready(&name, 2, Duration::from_secs(120)).await;
    answering(cluster, &name).await;
    (name, placed)
}

/// Waits until every agent answers `model`.
async fn answering(cluster: &Cluster, model: &str) {
    for url in &cluster.urls {
        until(
            &format!("{url} to answer {model}"),
            Duration::from_secs(60),
            async || (chat(url, model, "hi", 2).await.0 == 200).then_some(()),
        )
        .await;
    }
}

/// Waits until `traffic` has had `more` requests answered (beyond `since`).
async fn flows(traffic: &Traffic, since: u64, more: u64, what: &str) {
    until(
        &format!("{more} requests answered {what}"),
        Duration::from_secs(60),
        async || (traffic.answered() >= since + more).then_some(()),
    )
    .await;
}

/// Stops `traffic` and fails the test if any request failed.
async fn nothing_failed(traffic: Traffic, what: &str) {
    let (sent, answered, failures) = traffic.finish().await;
    eprintln!(
        "{what}: {sent} requests sent, {answered} answered, {} failed",
        failures.len()
    );
    // Each failure once per agent and answer (the time stripped), first seen first.
    let mut kinds: Vec<(&str, usize)> = Vec::new();
    for f in &failures {
        let kind = f.rsplit_once(" at ").map_or(f.as_str(), |(k, _)| k);
        match kinds.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => kinds.push((kind, 1)),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during {what}; first {:?} and last {:?}; by kind: {kinds:#?}",
        failures.len(),
        failures.first(),
        failures.last()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_under_load_moves_every_replica_off_and_fails_nothing() {
    let Some(mut cluster) = Cluster::start("drain", 3).await else {
        return;
    };
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let (name, placed) = two_replicas(&cluster, "drain").await;
    let (drained, kept) = (placed[0].clone(), placed[1].clone());
    let spare = cluster.nodes.iter().find(|n| !placed.contains(n)).unwrap();
    let load = Load {
        chats: 1,
        streams: 1,
        steering: Steering::Fixed,
    };
    let traffic = Traffic::with(&cluster.urls, &name, load);
    flows(&traffic, 0, 10, "before the drain").await;

    let agents: Api<NodeAgent> = Api::all(cluster.client.clone());
    let drain = json!({"metadata": {"annotations": {"weir.dev/drain": "true"}}});
    agents
        .patch(&drained, &PatchParams::default(), &Patch::Merge(&drain))
        .await
        .unwrap();
    let during = traffic.answered();
    made_before_broken(&cluster, &name, [&drained, &kept, spare]).await;
    drain_reported(&cluster, &drained).await;
    let mut now_on = cluster.ready(&name, 2, Duration::from_secs(60)).await;
    now_on.sort();
    let mut expected = vec![kept.clone(), spare.clone()];
    expected.sort();
    assert_eq!(now_on, expected, "{name} moved from {drained} to {spare}");
    let left = agents.get(&drained).await.unwrap();
    assert!(
        left.spec.models.is_empty(),
        "no replica is left on the drained {drained}: {:?}",
        left.spec.models
    );
    assert!(
        traffic.answered() > during,
        "requests were answered during the drain"
    );
    // Peers learn of the move from NodeAgent status: keep the load on until
    // well after it.
    flows(&traffic, traffic.answered(), 20, "after the drain").await;
    nothing_failed(traffic, "the drain").await;
    cluster.cleanup(&[&name]).await;
}

/// Watches `name`'s replica leave `drained` (polling all NodeAgents in one
/// list, a consistent snapshot, every 100 ms) until its entry is gone:
/// the replica on `kept` keeps its entry throughout, the replacement is
/// assigned to `spare`, and the old entry is still there while the
/// replacement is not reported Ready (seen at least once) and goes only
/// once it is.
async fn made_before_broken(cluster: &Cluster, name: &str, [drained, kept, spare]: [&str; 3]) {
    let agents: Api<NodeAgent> = Api::all(cluster.client.clone());
    let mut overlap: Option<Option<ModelPhase>> = None;
    let limit = Duration::from_secs(180);
    let period = Duration::from_millis(100);
    let gone = within_every(period, limit, async || {
        let list = agents.list(&ListParams::default()).await.ok()?;
        let find = |n: &str| list.items.iter().find(|a| a.name_any() == n);
        let (old, keep, new) = (find(drained)?, find(kept)?, find(spare)?);
        assert!(
            assigned(keep, name),
            "{name}'s replica on {kept} lost its entry during the drain"
        );
        let replacement = phase(new, name);
        if assigned(old, name) {
            if assigned(new, name) && replacement != Some(ModelPhase::Ready) {
                overlap.get_or_insert(replacement);
            }
            return None;
        }
        assert!(
            assigned(new, name) && replacement == Some(ModelPhase::Ready),
            "{name}'s entry left {drained} before its replacement on {spare} reported Ready \
             (assigned there: {}, reported: {replacement:?})",
            assigned(new, name)
        );
        Some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "{name}'s entry still on the drained {drained} after {limit:?}"
    );
    let seen = overlap.unwrap_or_else(|| {
        panic!(
            "never saw {name}'s replacement on {spare} assigned and not yet Ready while \
             {drained} kept its entry: the move was not made before it broke"
        )
    });
    eprintln!("{drained} kept {name}'s entry while its replacement on {spare} reported {seen:?}");
}

/// The drained NodeAgent ends with `Drained=True` (reason `Drained`), and
/// events `DrainStarted` and `Drained` name it.
async fn drain_reported(cluster: &Cluster, drained: &str) {
    let agents: Api<NodeAgent> = Api::all(cluster.client.clone());
    until(
        &format!("{drained} to report Drained=True"),
        Duration::from_secs(60),
        async || {
            let agent = agents.get(drained).await.ok()?;
            let done = ("True".to_owned(), "Drained".to_owned());
            (condition(&agent, "Drained")? == done).then_some(())
        },
    )
    .await;
    let events: Api<Event> = Api::all(cluster.client.clone());
    for reason in ["DrainStarted", "Drained"] {
        until(
            &format!("a {reason} event for {drained}"),
            Duration::from_secs(30),
            async || {
                let list = events.list(&ListParams::default()).await.ok()?;
                list.items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some(reason)
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(drained)
                    })
                    .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_agent_fails_no_request() {
    let Some(mut cluster) = Cluster::start("rolling", 3).await else {
        return;
    };
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let (name, _) = two_replicas(&cluster, "rolling").await;
    let load = Load {
        chats: 1,
        streams: 1,
        steering: Steering::Readiness,
    };
    let traffic = Traffic::with(&cluster.urls, &name, load);
    flows(&traffic, 0, 10, "before the restarts").await;
    for i in 0..cluster.nodes.len() {
        let node = cluster.nodes[i].clone();
        let since = traffic.answered();
        let stopped = Timestamp::now();
        let exit = cluster.terminate_agent(i, Duration::from_secs(60)).await;
        assert!(exit.success(), "{node}'s agent exits 0 on SIGTERM: {exit}");
        eprintln!("{node}'s agent drained and exited ({exit}); starting it again");
        cluster.restart_agent(i);
        let on = back_to_two(&cluster, &name, &node, stopped).await;
        eprintln!("{name} back to two Ready replicas, on {on:?}");
        flows(&traffic, since, 10, &format!("through {node}'s restart")).await;
    }
    nothing_failed(traffic, "the rolling restart").await;
    cluster.cleanup(&[&name]).await;
}

/// Waits until `restarted` (stopped at `stopped`) reports Ready again from
/// its new process and `name` has two replicas, each on an agent that is
/// Ready and reports the model Ready; their Nodes.
async fn back_to_two(
    cluster: &Cluster,
    name: &str,
    restarted: &str,
    stopped: Timestamp,
) -> Vec<String> {
    let models: Api<Model> = Api::namespaced(cluster.client.clone(), "default");
    let agents: Api<NodeAgent> = Api::all(cluster.client.clone());
    let serving = |a: &NodeAgent| {
        let ready = condition(a, "Ready").is_some_and(|(s, _)| s == "True");
        ready && assigned(a, name) && phase(a, name) == Some(ModelPhase::Ready)
    };
    until(
        &format!("{name} back to two Ready replicas after {restarted}'s restart"),
        Duration::from_secs(180),
        async || {
            let list = agents.list(&ListParams::default()).await.ok()?;
            let back = list.items.iter().find(|a| a.name_any() == restarted)?;
            let beat = back.status.as_ref()?.last_heartbeat_time.as_ref()?.0;
            let up = beat > stopped && condition(back, "Ready")?.0 == "True";
            let status = models.get(name).await.ok()?.status?;
            let all_serving = status.nodes.iter().all(|n| {
                let agent = list.items.iter().find(|a| a.name_any() == *n);
                agent.is_some_and(serving)
            });
            (up && status.ready_replicas == 2 && status.nodes.len() == 2 && all_serving)
                .then_some(status.nodes)
        },
    )
    .await
}

/// Long streams: hundreds of tokens each, past any end of sequence, from
/// the small test model (the tiny one answers them in under a second),
/// well within the agent's default 30 s drain timeout.
const STREAMS: usize = 8;
const TOKENS: u32 = 600;

/// How one stream ended.
struct Ended {
    body: String,
    at: Instant,
}

/// Starts `STREAMS` long streams of `model` on `url` and returns once each
/// has sent its first chunk; each handle gives its stream's body and end.
async fn long_streams(url: &str, model: &str) -> Vec<tokio::task::JoinHandle<Ended>> {
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(STREAMS);
    let handles = (0..STREAMS)
        .map(|i| {
            let body = json!({"model": model, "max_tokens": TOKENS, "ignore_eos": true,
                "messages": [{"role": "user", "content": format!("story {i}")}],
                "temperature": 0, "stream": true});
            let (url, first) = (url.to_owned(), first_tx.clone());
            tokio::spawn(async move { one_stream(&url, &body, first).await })
        })
        .collect();
    for _ in 0..STREAMS {
        tokio::time::timeout(Duration::from_secs(60), first_rx.recv())
            .await
            .expect("every stream sends a first chunk");
    }
    handles
}

async fn one_stream(url: &str, body: &Value, first: tokio::sync::mpsc::Sender<()>) -> Ended {
    let mut response = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("the stream starts");
    assert_eq!(response.status().as_u16(), 200, "the stream is accepted");
    let mut text = String::new();
    let mut told = false;
    while let Some(chunk) = response.chunk().await.expect("no cut connection") {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if !told && text.contains("chat.completion.chunk") {
            told = true;
            let _ = first.send(()).await;
        }
    }
    Ended {
        body: text,
        at: Instant::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unassigning_a_model_finishes_its_streams_in_flight() {
    let Some(mut cluster) = Cluster::start("unassign", 1).await else {
        return;
    };
    let uri = cluster.tiny("small", &TinyModelSpec::small());
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let name = format!("unassign-{}", cluster.tag);
    let one = json!({"min": 1, "max": 1});
    let models = cluster
        .model(&name, json!({"source": {"uri": uri}, "replicas": one}))
        .await;
    let holder = cluster.ready(&name, 1, Duration::from_secs(120)).await[0].clone();
    answering(&cluster, &name).await;
    let streams = long_streams(&cluster.urls[0], &name).await;
    let asked = Instant::now();
    models
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();

    let agents: Api<NodeAgent> = Api::all(cluster.client.clone());
    let unloading = until(
        &format!("{holder} to report {name} Unloading"),
        Duration::from_secs(30),
        async || {
            let agent = agents.get(&holder).await.ok()?;
            (phase(&agent, &name)? == ModelPhase::Unloading).then(Instant::now)
        },
    )
    .await;
    eprintln!(
        "{name} Unloading on {holder} {:?} after the delete",
        unloading - asked
    );
    let mut after = 0;
    for stream in streams {
        let ended = stream.await.expect("a stream");
        let body = ended.body.trim_end();
        let skip = body.chars().count().saturating_sub(300);
        let tail: String = body.chars().skip(skip).collect();
        assert!(
            body.ends_with("data: [DONE]") && !body.contains("\"error\""),
            "a stream in flight when {name} was unassigned must finish: …{tail}"
        );
        after += usize::from(ended.at > unloading);
        eprintln!("a stream ended {:?} after the delete", ended.at - asked);
    }
    assert!(
        after > 0,
        "no stream was still running once {name} was reported Unloading: the test proves nothing"
    );
    eprintln!("{after} of {STREAMS} streams finished after {name} was reported Unloading");
    until(
        &format!("{holder} to report {name} no more"),
        Duration::from_secs(60),
        async || {
            let agent = agents.get(&holder).await.ok()?;
            (phase(&agent, &name).is_none() && !assigned(&agent, &name)).then_some(())
        },
    )
    .await;
    cluster.cleanup(&[&name]).await;
}
