//! `weir-operator`: reconciles Weir resources into work for node agents.
//!
//! This binary starts the operator's HTTP endpoints (`/health`, `/ready`,
//! `/metrics`) and checks that the Weir API is installed in the cluster.
//! The controllers (placement, autoscaling, reweighting) build on it.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

mod api_check;
mod http;

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
    Run {
        /// Address of the health and metrics endpoints.
        #[arg(long, env = "WEIR_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
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
        Command::Run { listen } => run(listen).await,
    }
}

async fn run(listen: SocketAddr) -> anyhow::Result<()> {
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

    tokio::select! {
        result = server => result.context("HTTP server task")?.context("HTTP server"),
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted, shutting down");
            Ok(())
        }
    }
}
