//! Cluster suite (runs when `KUBECONFIG` names a cluster; skips
//! otherwise): scale to zero and back with held requests. A Model with
//! `min: 0` and a 5 s idle window scales to zero (condition and event
//! `ScaledToZero`); requests sent then are held by the agent that got them
//! and answered once the replica the operator brings back is Ready (the
//! time from request to first token is printed), while one more than the
//! bound gets 503 at once; a Model that cannot be placed holds its
//! requests only for `holdTimeoutSeconds`, then answers 503 with
//! `Retry-After`.

#[allow(dead_code)] // each suite binary uses its own part of the harness
mod cluster_support;

use std::time::{Duration, Instant};

use cluster_support::{Cluster, chat, until};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};
use weir_engine::testmodel::TinyModelSpec;

/// Streams a chat completion; the status, `Retry-After`, the body (or
/// error) and the seconds until the first token (or the head, when not 200).
async fn stream(url: &str, model: &str) -> (u16, Option<String>, String, f64) {
    let started = Instant::now();
    let body = json!({"model": model, "messages": [{"role": "user", "content": "wake up"}],
        "max_tokens": 4, "stream": true});
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .timeout(Duration::from_secs(180))
        .send()
        .await
        .expect("the agent answers");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut first = started.elapsed().as_secs_f64();
    let mut text = String::new();
    while let Ok(Some(chunk)) = r.chunk().await {
        let chunk = String::from_utf8_lossy(&chunk).into_owned();
        if status == 200 && !text.contains("\"content\"") && chunk.contains("\"content\"") {
            first = started.elapsed().as_secs_f64();
        }
        text.push_str(&chunk);
    }
    (status, retry, text, first)
}

async fn held(url: &str, model: &str) -> f64 {
    let Ok(r) = reqwest::get(format!("{url}/metrics")).await else {
        return 0.0;
    };
    let prefix = format!("weir_requests_held{{model_name=\"{model}\"}} ");
    r.text()
        .await
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn unavailable(body: &str) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"]["code"], "model_unavailable", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_scale_to_zero_and_held_requests_wake_them() {
    let Some(mut cluster) = Cluster::start("zero", 2).await else {
        return;
    };
    let uri = cluster.tiny("tiny", &TinyModelSpec::llama());
    let _operator = cluster.operator("only");
    cluster.start_agents();
    let name = format!("e2e-{}", cluster.tag);
    let models = cluster
        .model(
            &name,
            json!({"source": {"uri": uri}, "replicas": {"min": 0, "max": 1,
                "scaleToZeroAfterSeconds": 5, "holdTimeoutSeconds": 120, "maxHeldRequests": 2}}),
        )
        .await;
    cluster.ready(&name, 1, Duration::from_secs(120)).await;
    assert_eq!(chat(&cluster.urls[0], &name, "hi", 2).await.0, 200);

    // Idle for the window: scaled to zero.
    let idle_from = Instant::now();
    until(
        "the Model to scale to zero",
        Duration::from_secs(90),
        async || {
            let s = models.get(&name).await.ok()?.status?;
            let c = s.common.conditions.first()?;
            (s.desired_replicas == 0 && s.nodes.is_empty() && c.reason == "ScaledToZero")
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "scaled to zero {:.1} s after the last request",
        idle_from.elapsed().as_secs_f64()
    );
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    let event_of = async |reason: &str| {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(&name)
            })
            .then_some(())
    };
    until(
        "a ScaledToZero event",
        Duration::from_secs(30),
        async || event_of("ScaledToZero").await,
    )
    .await;
    let front = cluster.urls[0].clone();
    until(
        "the replica to be gone from routing",
        Duration::from_secs(60),
        async || {
            let models: Value = reqwest::get(format!("{front}/v1/models"))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let listed = models["data"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == name.as_str());
            (!listed).then_some(())
        },
    )
    .await;

    // Two requests are held; a third is over the bound.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let (url, name) = (front.clone(), name.clone());
            tokio::spawn(async move { stream(&url, &name).await })
        })
        .collect();
    until("two held requests", Duration::from_secs(30), async || {
        (held(&front, &name).await == 2.0).then_some(())
    })
    .await;
    let (status, retry, body, secs) = stream(&front, &name).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        retry.is_some() && secs < 1.0,
        "Retry-After {retry:?} after {secs:.2} s"
    );
    unavailable(&body);
    for w in waiting {
        let (status, _, body, first) = w.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
        eprintln!("scale from zero: request to first token {first:.1} s");
    }
    until(
        "a ScaledFromZero event",
        Duration::from_secs(30),
        async || event_of("ScaledFromZero").await,
    )
    .await;

    // A Model no node can take holds its requests for holdTimeoutSeconds.
    let stuck = format!("{name}-stuck");
    cluster
        .model(
            &stuck,
            json!({"source": {"uri": uri}, "nodeSelector": {"weir.dev/e2e": "nowhere"},
                "replicas": {"min": 0, "max": 1, "holdTimeoutSeconds": 2, "maxHeldRequests": 1}}),
        )
        .await;
    until(
        "the agents to know the new Model",
        Duration::from_secs(30),
        async || {
            let probe = reqwest::Client::new()
                .post(format!("{front}/v1/chat/completions"))
                .json(
                    &json!({"model": stuck, "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 1}),
                )
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .ok()?;
            (probe.status().as_u16() == 503).then_some(())
        },
    )
    .await;
    let (status, retry, body, secs) = stream(&front, &stuck).await;
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "no Retry-After");
    assert!(
        (2.0..6.0).contains(&secs),
        "refused after {secs:.2} s, not the hold timeout"
    );
    unavailable(&body);
    eprintln!("held past holdTimeoutSeconds: 503 after {secs:.1} s");

    cluster.cleanup(&[&name, &stuck]).await;
}
