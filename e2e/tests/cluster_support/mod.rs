//! Harness of the cluster suite: Nodes made for the test (each with a
//! kubelet stand-in, [`kubelet`]), agents and operators as local
//! processes, polling helpers, a chat load ([`traffic`]), what a node
//! lifecycle controller writes ([`lifecycle`]), and clean-up. Tests hold an
//! exclusive file lock for their whole run, because every operator acts on
//! every Model in the cluster: two tests' operators must never run at once
//! (the suite may run in parallel processes under nextest).

pub mod kubelet;
pub mod lifecycle;
pub mod traffic;

use std::fs::File;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use weir_crds::{Model, NodeAgent};
use weir_e2e::cluster_client;
use weir_e2e::process::{binary, free_port};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

use kubelet::Kubelet;

/// A child process, killed when dropped.
pub struct Proc(Child);

impl Proc {
    /// Starts a workspace binary with `args`.
    pub fn spawn(name: &str, args: &[String]) -> Self {
        Self(
            Command::new(binary(name))
                .args(args)
                .env("RUST_LOG", "info")
                .stdout(Stdio::inherit())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {name}: {e}")),
        )
    }
}

impl Proc {
    /// Asks the process to stop as the kubelet does (SIGTERM).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {}: {status}", self.0.id());
    }

    /// Waits up to `limit` for the process to exit; its status, if it did.
    pub async fn exited(&mut self, limit: Duration) -> Option<ExitStatus> {
        within(limit, async || self.0.try_wait().ok().flatten()).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `probe` every half second until it gives a value; `None` after
/// `limit`.
pub async fn within<T>(limit: Duration, probe: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    within_every(Duration::from_millis(500), limit, probe).await
}

/// Polls `probe` every `period` until it gives a value; `None` after
/// `limit`.
pub async fn within_every<T>(
    period: Duration,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(period).await;
    }
}

/// Polls `probe` every half second until it gives a value; fails the test
/// after `limit`.
pub async fn until<T>(what: &str, limit: Duration, probe: impl AsyncFnMut() -> Option<T>) -> T {
    within(limit, probe)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what} ({limit:?})"))
}

/// Checks `probe` every half second for `span`; fails the test with its
/// message the first time it does not hold.
pub async fn holds(what: &str, span: Duration, mut probe: impl AsyncFnMut() -> Result<(), String>) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        if let Err(why) = probe().await {
            panic!("{what} stopped holding: {why}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// An operator process and its `/metrics` address.
pub struct Operator {
    _proc: Proc,
    /// Base URL of its health and metrics endpoints.
    pub url: String,
}

impl Operator {
    /// The value of an unlabelled or fully labelled sample on `/metrics`
    /// (`None` while unreachable or absent).
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

/// One test's share of the cluster.
pub struct Cluster {
    /// API client.
    pub client: kube::Client,
    /// Unique to this test run: labels its Nodes and names its objects.
    pub tag: String,
    /// The Nodes this test made (one per agent).
    pub nodes: Vec<String>,
    /// Their kubelet stand-ins, by node.
    pub kubelets: Vec<Kubelet>,
    /// Agent processes (`None` once stopped), by node.
    pub agents: Vec<Option<Proc>>,
    /// Agent base URLs, by node.
    pub urls: Vec<String>,
    /// Agent ports, by node (a restarted agent listens on its old one).
    ports: Vec<u16>,
    /// Scratch space (model files).
    pub dir: tempfile::TempDir,
    _serial: File,
}

async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in weir_crds::all() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("weir-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}

impl Cluster {
    /// Takes the suite lock, installs the CRDs, and makes `count` Nodes for
    /// test `name`; `None` (skip) when `KUBECONFIG` names no cluster.
    pub async fn start(name: &str, count: usize) -> Option<Self> {
        let client = cluster_client().await?;
        let lock = std::env::temp_dir().join("weir-cluster-suite.lock");
        let serial = File::create(&lock).expect("the suite lock file");
        let serial = tokio::task::spawn_blocking(move || {
            serial.lock().expect("the suite lock");
            serial
        })
        .await
        .unwrap();
        install_crds(&client).await;
        let tag = format!("{name}-{}", std::process::id());
        let nodes: Vec<String> = (1..=count).map(|i| format!("weir-e2e-{tag}-{i}")).collect();
        let api: Api<Node> = Api::all(client.clone());
        let mut kubelets = Vec::new();
        for n in &nodes {
            let node: Node = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n, "labels": {"weir.dev/e2e": tag}}}))
            .unwrap();
            let created = api.create(&PostParams::default(), &node).await.unwrap();
            kubelets.push(Kubelet::start(client.clone(), &created));
        }
        settled(&api, &tag, count).await;
        Some(Self {
            client,
            tag,
            nodes,
            kubelets,
            agents: Vec::new(),
            urls: Vec::new(),
            ports: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            _serial: serial,
        })
    }

    /// Writes a tiny test model named `name` into the scratch space; its
    /// `file://` URI.
    pub fn tiny(&self, name: &str, spec: &TinyModelSpec) -> String {
        let dir = self.dir.path().join(name);
        write_tiny_model(&dir, spec).unwrap();
        format!("file://{}", dir.display())
    }

    /// Index of Node `node` among this test's.
    fn index(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n == node)
            .unwrap_or_else(|| panic!("{node} is not one of this test's Nodes"))
    }

    /// Stops `node`'s kubelet heartbeats (its Ready condition and Lease;
    /// the agent there goes on reporting). None is in flight on return.
    pub async fn stop_heartbeats(&self, node: &str) {
        self.kubelets[self.index(node)].stop().await;
    }

    /// Resumes `node`'s kubelet heartbeats, the first at once.
    pub fn resume_heartbeats(&self, node: &str) {
        self.kubelets[self.index(node)].resume();
    }

    /// Cordons (`spec.unschedulable: true`) or uncordons `node`.
    pub async fn cordon(&self, node: &str, cordoned: bool) {
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = json!({"spec": {"unschedulable": cordoned}});
        api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("cordoning {node} ({cordoned}): {e}"));
    }

    /// Starts one agent per Node, in cluster mode.
    pub fn start_agents(&mut self) {
        for i in 0..self.nodes.len() {
            let port = free_port();
            self.ports.push(port);
            self.urls.push(format!("http://127.0.0.1:{port}"));
            let agent = self.spawn_agent(i);
            self.agents.push(Some(agent));
        }
    }

    /// The agent of Node `i`, on its port.
    fn spawn_agent(&self, i: usize) -> Proc {
        Proc::spawn(
            "weir-agent",
            &[
                "serve".into(),
                "--cluster".into(),
                format!("--listen=127.0.0.1:{}", self.ports[i]),
                format!("--node-name={}", self.nodes[i]),
                "--pod-ip=127.0.0.1".into(),
            ],
        )
    }

    /// Stops Node `i`'s agent as a kubelet does (SIGTERM) and waits up to
    /// `limit` for it to exit; how it exited.
    pub async fn terminate_agent(&mut self, i: usize, limit: Duration) -> ExitStatus {
        let node = &self.nodes[i];
        let agent = self.agents[i]
            .as_mut()
            .unwrap_or_else(|| panic!("{node}'s agent is not running"));
        agent.terminate();
        let status = agent.exited(limit).await;
        let status =
            status.unwrap_or_else(|| panic!("{node}'s agent still runs {limit:?} after SIGTERM"));
        self.agents[i] = None;
        status
    }

    /// Starts Node `i`'s agent again, on the same port (so the same URL).
    pub fn restart_agent(&mut self, i: usize) {
        assert!(
            self.agents[i].is_none(),
            "{}'s agent still runs",
            self.nodes[i]
        );
        self.agents[i] = Some(self.spawn_agent(i));
    }

    /// Starts an operator with leader election on this test's Lease.
    pub fn operator(&self, identity: &str) -> Operator {
        let port = free_port();
        let proc = Proc::spawn(
            "weir-operator",
            &[
                "run".into(),
                format!("--listen=127.0.0.1:{port}"),
                "--leader-election".into(),
                "--lease-namespace=default".into(),
                format!("--lease-name=weir-e2e-{}", self.tag),
                format!("--identity={identity}"),
            ],
        );
        Operator {
            _proc: proc,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A Model on this test's Nodes (`spec` merged over the defaults).
    pub async fn model(&self, name: &str, spec: serde_json::Value) -> Api<Model> {
        let models: Api<Model> = Api::namespaced(self.client.clone(), "default");
        let mut full =
            json!({"resources": {"gpus": 0}, "nodeSelector": {"weir.dev/e2e": self.tag}});
        for (k, v) in spec.as_object().unwrap() {
            full[k] = v.clone();
        }
        let model: Model = serde_json::from_value(json!({"apiVersion": "weir.dev/v1alpha1",
            "kind": "Model", "metadata": {"name": name, "namespace": "default"}, "spec": full}))
        .unwrap();
        models.create(&PostParams::default(), &model).await.unwrap();
        models
    }

    /// Waits until Model `name` reports `ready` ready replicas; its nodes.
    pub async fn ready(&self, name: &str, ready: u32, limit: Duration) -> Vec<String> {
        let models: Api<Model> = Api::namespaced(self.client.clone(), "default");
        until(
            &format!("{name}: {ready} ready replicas"),
            limit,
            async || {
                let s = models.get(name).await.ok()?.status?;
                (s.ready_replicas == ready && s.nodes.len() == ready as usize).then_some(s.nodes)
            },
        )
        .await
    }

    /// Deletes the given Models (waiting until the operator released them),
    /// this test's Nodes and NodeAgents.
    pub async fn cleanup(mut self, models: &[&str]) {
        let api: Api<Model> = Api::namespaced(self.client.clone(), "default");
        for m in models {
            let _ = api.delete(m, &DeleteParams::default()).await;
        }
        until(
            "deleted Models to be released",
            Duration::from_secs(60),
            async || {
                for m in models {
                    if api.get_opt(m).await.ok()?.is_some() {
                        return None;
                    }
                }
                Some(())
            },
        )
        .await;
        // Stop the agents first, or they register their NodeAgents again;
        // and the kubelets, or they write to Nodes being deleted.
        drop(std::mem::take(&mut self.agents));
        drop(std::mem::take(&mut self.kubelets));
        let node_leases: Api<Lease> =
            Api::namespaced(self.client.clone(), kubelet::LEASE_NAMESPACE);
        let nodes: Api<Node> = Api::all(self.client.clone());
        let agents: Api<NodeAgent> = Api::all(self.client.clone());
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "default");
        let _ = leases
            .delete(&format!("weir-e2e-{}", self.tag), &DeleteParams::default())
            .await;
        for n in &self.nodes {
            let _ = nodes.delete(n, &DeleteParams::default()).await;
            let _ = agents.delete(n, &DeleteParams::default()).await;
            let _ = node_leases.delete(n, &DeleteParams::default()).await;
        }
    }
}

/// Waits until the `count` Nodes labelled `tag` are Ready and carry no
/// `node.kubernetes.io/` taint: on a real cluster, admission taints a new
/// Node `not-ready` until the node lifecycle controller sees it Ready.
async fn settled(api: &Api<Node>, tag: &str, count: usize) {
    let selector = ListParams::default().labels(&format!("weir.dev/e2e={tag}"));
    until(
        "the new Nodes to be Ready and untainted",
        Duration::from_secs(90),
        async || {
            let list = api.list(&selector).await.ok()?;
            let fine = |n: &Node| {
                let tainted = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|ts| ts.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
                kubelet::ready_since(n).is_some() && !tainted
            };
            (list.items.len() == count && list.items.iter().all(fine)).then_some(())
        },
    )
    .await;
}

/// One chat completion to `url` for `model`; the status and the ensemble
/// member that answered.
pub async fn chat(url: &str, model: &str, prompt: &str, max_tokens: u32) -> (u16, Option<String>) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 1.0});
    let Ok(r) = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
    else {
        return (0, None);
    };
    let member = r
        .headers()
        .get("x-weir-ensemble-member")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (r.status().as_u16(), member)
}
