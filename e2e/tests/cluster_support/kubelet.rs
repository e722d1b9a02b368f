//! A kubelet stand-in for each Node the suite creates: it keeps the Node's
//! `Ready` condition and its Lease in `kube-node-lease` fresh, as a kubelet
//! does, so that a node lifecycle controller (kube-controller-manager)
//! leaves the Node alone instead of tainting it unreachable.
//!
//! It stands for the kubelet only. The agent on the node keeps its own
//! heartbeat (the NodeAgent's status), which this never touches: stopping
//! a [`Kubelet`] is a node whose kubelet went quiet while the agent still
//! reports.
//!
//! Guarantees: each beat writes `Ready=True` (reason `KubeletReady`)
//! through the Node's status subresource with `lastHeartbeatTime` now and
//! `lastTransitionTime` kept while the condition was already `True` (now
//! otherwise), then renews the Lease (holder the node, 40 s, `renewTime`
//! now, owned by the Node so that the garbage collector takes it with the
//! Node). Beats run every [`PERIOD`] while on. Once [`Kubelet::stop`]
//! returns no beat is in flight and none follows until [`Kubelet::resume`],
//! which beats at once.
//!
//! Caveats: a failed beat is logged and retried at the next period, as a
//! kubelet retries; a Node that is gone ends the task (a kubelet would
//! register it again; the suite deletes Nodes to lose them). The Ready
//! condition replaces the Node's whole condition list (a JSON merge patch:
//! the dev server's Node is a custom resource, which takes no strategic
//! merge patch).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinHandle;

/// How often a kubelet stand-in beats (a kubelet renews its Lease every
/// 10 s).
pub const PERIOD: Duration = Duration::from_secs(10);
/// Namespace of the node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// `leaseDurationSeconds` of the node Leases, as a kubelet writes it.
pub const LEASE_SECONDS: i32 = 40;
const MANAGER: &str = "weir-e2e-kubelet";

struct Shared {
    beating: AtomicBool,
    /// Held for the length of each beat.
    beat: Mutex<()>,
    wake: Notify,
}

/// The kubelet stand-in of one Node; its task ends when dropped.
pub struct Kubelet {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Kubelet {
    /// Starts beating for `node` (as created, so that its uid is known):
    /// the first beat at once.
    pub fn start(client: kube::Client, node: &Node) -> Self {
        let shared = Arc::new(Shared {
            beating: AtomicBool::new(true),
            beat: Mutex::new(()),
            wake: Notify::new(),
        });
        let (name, uid) = (node.name_any(), node.uid().unwrap_or_default());
        let task = tokio::spawn(run(client, name, uid, shared.clone()));
        Self { shared, task }
    }

    /// Stops the heartbeats; when this returns, none is in flight.
    pub async fn stop(&self) {
        self.shared.beating.store(false, Ordering::SeqCst);
        drop(self.shared.beat.lock().await);
    }

    /// Resumes the heartbeats, the first at once.
    pub fn resume(&self) {
        self.shared.beating.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(client: kube::Client, node: String, uid: String, shared: Arc<Shared>) {
    loop {
        {
            let _beating = shared.beat.lock().await;
            if shared.beating.load(Ordering::SeqCst) {
                match beat(&client, &node, &uid).await {
                    Ok(()) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => return,
                    Err(e) => eprintln!("kubelet stand-in for {node}: heartbeat failed: {e}"),
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(PERIOD) => {}
            () = shared.wake.notified() => {}
        }
    }
}

/// One heartbeat: the Ready condition, then the Lease.
async fn beat(client: &kube::Client, node: &str, uid: &str) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = Timestamp::now();
    let current = nodes.get_status(node).await?;
    let since = ready_since(&current).unwrap_or(Time(now));
    let ready = json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status",
        "lastHeartbeatTime": Time(now), "lastTransitionTime": since});
    nodes
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [ready]}})),
        )
        .await?;
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": MicroTime(now)}});
    leases
        .patch(
            node,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}

/// When the Node's Ready condition became `True`, if it is `True`.
pub fn ready_since(node: &Node) -> Option<Time> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .clone()
}

/// When `node`'s Lease was last renewed, if it has one.
pub async fn renewed(client: &kube::Client, node: &str) -> Option<Timestamp> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let lease = leases.get_opt(node).await.ok()??;
    Some(lease.spec?.renew_time?.0)
}
