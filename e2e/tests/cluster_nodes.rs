//! Cluster suite, Nodes (runs when `KUBECONFIG` names a cluster; skips
//! otherwise): how the operator treats Nodes as a kubelet and the node
//! lifecycle controller show them. Every Node the suite makes has a kubelet
//! stand-in keeping its Ready condition and Lease fresh
//! (`cluster_support/kubelet.rs`).
//!
//! - A kubelet that stops: the Node's own heartbeats (its Ready condition
//!   and its Lease in `kube-node-lease`) stop, while the agent there goes
//!   on serving and reporting its NodeAgent. A kube-controller-manager
//!   taints the Node `node.kubernetes.io/unreachable` by itself; without
//!   one (the development API server) the test writes what it would. The
//!   `NoSchedule` taint alone moves nothing; with `NoExecute`, a Model on
//!   the default 300 s toleration stays and one tolerating it for 5 s
//!   moves within 5 s and a reconcile interval. Heartbeats resume: Ready
//!   again, taints gone.
//! - A cordon under a steady stream of chats: nothing moves, no request
//!   fails, new replicas of a scale-up avoid cordoned Nodes, and an
//!   uncordoned Node takes one again.

#[allow(dead_code)] // each suite binary uses its own part of the harness
mod cluster_support;

use std::time::Duration;

use cluster_support::lifecycle::{self, UNREACHABLE};
use cluster_support::traffic::Traffic;
use cluster_support::{Cluster, Operator, chat, holds, kubelet, until, within};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use weir_crds::Model;
use weir_engine::testmodel::TinyModelSpec;

/// The operator's reconcile interval (its default).
const INTERVAL: Duration = Duration::from_secs(10);
/// Reconciles of Models, on the operator's `/metrics`.
const RECONCILES: &str = "weir_operator_reconciles_total{kind=\"Model\"}";

/// Where `model` is placed and how many replicas are ready there.
async fn placed(models: &Api<Model>, model: &str) -> Result<(Vec<String>, u32), String> {
    let m = models.get(model).await.map_err(|e| e.to_string())?;
    let s = m.status.ok_or(format!("{model} has no status"))?;
    Ok((s.nodes, s.ready_replicas))
}

/// Checks for longer than a reconcile interval that every Model of
/// `models` keeps its single ready replica on `node`, and that the
/// operator reconciled Models meanwhile.
async fn nothing_moves(cluster: &Cluster, operator: &Operator, models: &[&str], node: &str) {
    let api: Api<Model> = Api::namespaced(cluster.client.clone(), "default");
    let before = operator.metric(RECONCILES).await.unwrap_or(0.0);
    let span = INTERVAL + Duration::from_secs(5);
    holds(&format!("{models:?} staying on {node}"), span, async || {
        for m in models {
            let now = placed(&api, m).await?;
            if now != (vec![node.to_owned()], 1) {
                return Err(format!("{m} is on {now:?}"));
            }
        }
        Ok(())
    })
    .await;
    let after = operator.metric(RECONCILES).await.unwrap_or(0.0);
    assert!(
        after >= before + models.len() as f64,
        "the operator reconciled Models while they stayed ({before} → {after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_kubelet_stops_keeps_replicas_for_their_tolerations() {
    let Some(mut cluster) = Cluster::start("unreachable", 2).await else {
        return;
    };
    let uri = cluster.tiny("tiny", &TinyModelSpec::llama());
    let operator = cluster.operator("only");
    cluster.start_agents();
    let (quiet, spare) = (cluster.nodes[0].clone(), cluster.nodes[1].clone());
    let patient = format!("patient-{}", cluster.tag);
    let brief = format!("brief-{}", cluster.tag);
    // Both Models on `quiet`: the spare is cordoned while they are placed.
    cluster.cordon(&spare, true).await;
    let one = json!({"min": 1, "max": 1});
    cluster
        .model(&patient, json!({"source": {"uri": uri}, "replicas": one}))
        .await;
    let five_seconds = json!([{"key": UNREACHABLE, "operator": "Exists",
        "effect": "NoExecute", "tolerationSeconds": 5}]);
    cluster
        .model(
            &brief,
            json!({"source": {"uri": uri}, "replicas": one, "tolerations": five_seconds}),
        )
        .await;
    for m in [&patient, &brief] {
        let on = cluster.ready(m, 1, Duration::from_secs(120)).await;
        assert_eq!(on, [quiet.as_str()], "{m} on the only uncordoned Node");
    }
    cluster.cordon(&spare, false).await;

    let stopped = Timestamp::now();
    cluster.stop_heartbeats(&quiet).await;
    let last = kubelet::renewed(&cluster.client, &quiet).await;
    assert!(last.is_some(), "{quiet} has a renewed node Lease");
    let emulated = tainted_unreachable(&cluster, &operator, &quiet, [&patient, &brief]).await;
    let api: Api<Node> = Api::all(cluster.client.clone());
    let added = until(
        "an unreachable:NoExecute taint with timeAdded",
        Duration::from_secs(60),
        async || {
            let t = lifecycle::taint(&api, &quiet, UNREACHABLE, "NoExecute").await?;
            Some(t.time_added?.0)
        },
    )
    .await;
    only_the_short_toleration_moves(&cluster, [&patient, &brief], [&quiet, &spare], added).await;
    let still = kubelet::renewed(&cluster.client, &quiet).await;
    assert_eq!(still, last, "{quiet}'s Lease went unrenewed while stopped");
    heartbeats_resume(&cluster, &quiet, stopped, emulated).await;
    until(
        &format!("{quiet}'s Lease to be renewed again"),
        kubelet::PERIOD,
        async || (kubelet::renewed(&cluster.client, &quiet).await > last).then_some(()),
    )
    .await;
    cluster.cleanup(&[&patient, &brief]).await;
}

/// Waits for the node lifecycle controller to taint `quiet` unreachable,
/// or, where none runs, writes what it would (Ready `Unknown` and the
/// `NoSchedule` taint; checking that this alone moves none of `models`;
/// then the `NoExecute` taint). Whether it was written here.
async fn tainted_unreachable(
    cluster: &Cluster,
    operator: &Operator,
    quiet: &str,
    models: [&str; 2],
) -> bool {
    let api: Api<Node> = Api::all(cluster.client.clone());
    let real = lifecycle::controller_manager_runs(&cluster.client).await;
    // A controller acts after its grace period (40-50 s) and a monitor period.
    let wait = Duration::from_secs(if real { 150 } else { 10 });
    let seen = within(wait, async || {
        lifecycle::taint(&api, quiet, UNREACHABLE, "NoSchedule").await
    })
    .await;
    if seen.is_some() {
        eprintln!("the node lifecycle controller tainted {quiet} unreachable");
        return false;
    }
    assert!(
        !real,
        "a kube-controller-manager runs, but {quiet} was not tainted {UNREACHABLE} in {wait:?}"
    );
    eprintln!("no node lifecycle controller: tainting {quiet} as it would");
    lifecycle::mark_unknown(&api, quiet).await;
    lifecycle::add_taint(&api, quiet, UNREACHABLE, "NoSchedule").await;
    nothing_moves(cluster, operator, &models, quiet).await;
    lifecycle::add_taint(&api, quiet, UNREACHABLE, "NoExecute").await;
    true
}

/// With `quiet` tainted unreachable:NoExecute since `added`: a toleration
/// with time left is a voluntary move, made before it breaks — `brief`
/// (tolerating it for 5 s) is served throughout, by `quiet` until a
/// replacement on `spare` is Ready, and is off `quiet` by its deadline plus a
/// reconcile interval; `patient` (the default 300 s) is served throughout
/// too, wherever its replica is.
async fn only_the_short_toleration_moves(
    cluster: &Cluster,
    [patient, brief]: [&str; 2],
    [quiet, spare]: [&str; 2],
    added: Timestamp,
) {
    let models: Api<Model> = Api::namespaced(cluster.client.clone(), "default");
    let after = |secs: i64| {
        let at = added + SignedDuration::from_secs(secs);
        Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default()
    };
    holds(
        &format!("{brief} on {quiet} within its 5 s toleration"),
        after(3),
        async || match placed(&models, brief).await?.0 {
            on if !on.is_empty() => Ok(()),
            on => Err(format!(
                "{brief} lost its replica before a replacement: {on:?}"
            )),
        },
    )
    .await;
    let limit = after(5) + INTERVAL + Duration::from_secs(5);
    until(
        &format!("{brief} to leave {quiet} after its 5 s toleration"),
        limit,
        async || {
            let on = placed(&models, brief).await.ok()?.0;
            (!on.iter().any(|n| n == quiet)).then_some(())
        },
    )
    .await;
    let moved = Timestamp::now().duration_since(added);
    eprintln!("{brief} left {quiet} {moved:?} after the NoExecute taint");
    let on = cluster.ready(brief, 1, Duration::from_secs(60)).await;
    assert_eq!(on, [spare], "{brief} moved to the spare Node");
    // Well past 5 s, the default toleration still holds.
    let api: Api<Node> = Api::all(cluster.client.clone());
    let taint = lifecycle::taint(&api, quiet, UNREACHABLE, "NoExecute").await;
    assert!(taint.is_some(), "{quiet} is still tainted NoExecute");
    let (on, _) = placed(&models, patient).await.unwrap();
    assert!(!on.is_empty(), "{patient} keeps a replica");
    cluster.ready(patient, 1, Duration::from_secs(60)).await;
}

/// `quiet`'s kubelet resumes: a new Ready=True (since after `stopped`) and,
/// once the controller (or, `emulated`, this test) takes them off, no
/// unreachable taints.
async fn heartbeats_resume(cluster: &Cluster, quiet: &str, stopped: Timestamp, emulated: bool) {
    let api: Api<Node> = Api::all(cluster.client.clone());
    cluster.resume_heartbeats(quiet);
    until(
        &format!("{quiet} Ready again"),
        Duration::from_secs(30),
        async || {
            let since = kubelet::ready_since(&api.get(quiet).await.ok()?)?;
            (since.0 >= stopped - SignedDuration::from_secs(1)).then_some(())
        },
    )
    .await;
    if emulated {
        lifecycle::remove_taints(&api, quiet, UNREACHABLE).await;
    }
    until(
        &format!("the unreachable taints off {quiet}"),
        Duration::from_secs(60),
        async || {
            let taints = lifecycle::taints(&api, quiet).await;
            (!taints.iter().any(|t| t.key == UNREACHABLE)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordon_moves_nothing_fails_nothing_and_keeps_new_replicas_off() {
    let Some(mut cluster) = Cluster::start("cordon", 3).await else {
        return;
    };
    let uri = cluster.tiny("tiny", &TinyModelSpec::llama());
    let operator = cluster.operator("only");
    cluster.start_agents();
    let name = format!("cordon-{}", cluster.tag);
    let one = json!({"min": 1, "max": 1});
    cluster
        .model(&name, json!({"source": {"uri": uri}, "replicas": one}))
        .await;
    let holder = cluster.ready(&name, 1, Duration::from_secs(120)).await[0].clone();
    let others: Vec<String> = cluster
        .nodes
        .iter()
        .filter(|n| **n != holder)
        .cloned()
        .collect();
    let (empty, free) = (&others[0], &others[1]);
    for url in &cluster.urls {
        until(
            &format!("{url} to answer {name}"),
            Duration::from_secs(60),
            async || (chat(url, &name, "hi", 2).await.0 == 200).then_some(()),
        )
        .await;
    }
    let traffic = Traffic::start(&cluster.urls, &name);
    until("the load to flow", Duration::from_secs(30), async || {
        (traffic.answered() >= 10).then_some(())
    })
    .await;

    // Cordoning the holder and an empty Node moves nothing.
    cluster.cordon(&holder, true).await;
    cluster.cordon(empty, true).await;
    nothing_moves(&cluster, &operator, &[&name], &holder).await;
    new_replicas_avoid_cordons(&cluster, &name, &holder, [empty, free]).await;
    cluster.cordon(&holder, false).await;
    let (answered, failures) = traffic.stop().await;
    eprintln!("{answered} requests answered during the cordon, scale-up and uncordon");
    assert!(
        failures.is_empty(),
        "{} requests failed ({answered} answered): {failures:?}",
        failures.len()
    );
    cluster.cleanup(&[&name]).await;
}

/// With `holder` (serving `name`'s one replica) and `empty` cordoned, a
/// scale-up to three places the second replica on `free` only and reports
/// the third unplaced for the cordon; uncordoned, `empty` takes it.
async fn new_replicas_avoid_cordons(
    cluster: &Cluster,
    name: &str,
    holder: &str,
    [empty, free]: [&str; 2],
) {
    let models: Api<Model> = Api::namespaced(cluster.client.clone(), "default");
    let three = json!({"spec": {"replicas": {"min": 3, "max": 3}}});
    models
        .patch(name, &PatchParams::default(), &Patch::Merge(&three))
        .await
        .unwrap();
    let mut two = vec![holder.to_owned(), free.to_owned()];
    two.sort();
    let status = until(
        "a second replica, on the uncordoned Node only",
        Duration::from_secs(120),
        async || {
            let s = models.get(name).await.ok()?.status?;
            assert!(
                !s.nodes.iter().any(|n| n == empty),
                "a new replica landed on the cordoned {empty}: {:?}",
                s.nodes
            );
            (s.desired_replicas == 3 && s.nodes == two && s.ready_replicas == 2).then_some(s)
        },
    )
    .await;
    let ready = status.common.conditions.iter().find(|c| c.type_ == "Ready");
    assert!(
        ready.is_some_and(|c| c.reason == "Unplaced"
            && c.message.contains(empty)
            && c.message.contains("node.kubernetes.io/unschedulable")),
        "the third replica is unplaced for the cordon: {ready:?}"
    );

    // Uncordoned, the empty Node takes the third replica.
    cluster.cordon(empty, false).await;
    until(
        "a third replica on the uncordoned Node",
        Duration::from_secs(120),
        async || {
            let (on, ready) = placed(&models, name).await.ok()?;
            (on.iter().any(|n| n == empty) && on.iter().any(|n| n == holder) && ready == 3)
                .then_some(())
        },
    )
    .await;
}
