//! `weir-operator`: reconciles Weir resources into work for node agents.
//!
//! This binary serves the operator's HTTP endpoints (`/health`, `/ready`,
//! `/metrics`), waits for the Weir API to be installed, takes part in
//! leader election, and runs the control loop (placement, autoscaling,
//! ensemble reweighting, statuses and events) while it is the leader.

use std::net::SocketAddr;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use weir_operator::{api_check, controller, http, leader};

/// Command line of the operator.
#[derive(Parser, Debug)]
#[command(
    name = "weir-operator",
    version,
    about = "The Weir Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the operator against the cluster from KUBECONFIG or the in-cluster config.
    Run(RunArgs),
}

/// Flags of `weir-operator run`.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the health and metrics endpoints.
    #[arg(long, env = "WEIR_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Elect one active replica through a Lease (for more than one replica).
    #[arg(long)]
    leader_election: bool,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "weir-operator")]
    lease_name: String,
    /// This replica's identity in the election (its pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let listen = args.listen;
    let state = http::State::new();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, "serving /health, /ready and /metrics");
    let server = tokio::spawn(http::serve(listener, state.clone()));

    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    api_check::wait_for_api(&client, &state).await;
    let leader = Arc::new(AtomicBool::new(!args.leader_election));
    if args.leader_election {
        let identity = args
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .context("--leader-election needs an identity (POD_NAME or --identity)")?;
        let election = leader::Election {
            namespace: args.lease_namespace.clone(),
            name: args.lease_name.clone(),
            identity,
            duration: std::time::Duration::from_secs(15),
        };
        tokio::spawn(leader::run(client.clone(), election, leader.clone()));
    }
    state.watch_leadership(leader.clone());
    tokio::spawn(controller::run(
        client.clone(),
        leader.clone(),
        state.metrics.clone(),
    ));

    tokio::select! {
        result = server => result.context("HTTP server task")?.context("HTTP server"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted, shutting down");
            Ok(())
        }
    }
}
