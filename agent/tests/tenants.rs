//! Tenants over real HTTP on a loopback socket, serving the built-in model:
//! keys (401 `invalid_api_key`), allowed models (403 `model_not_allowed`),
//! rate limits (429 with `Retry-After` and `x-ratelimit-*`), the tenant
//! header trusted only with the peer token, `/metrics` behind its token,
//! and cache entries scoped to tenants that do not share.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{ModelRegistry, ModelSpec, ServedModel, ensure_builtin};
use weir_agent::tenants::Tenant;
use weir_crds::TenantSpec;

fn builtin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("weir-agent-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        ensure_builtin(&root).unwrap()
    })
    .clone()
}

fn spec(value: Value) -> TenantSpec {
    let mut value = value;
    value["apiKeys"] = json!([{"name": "unused", "key": "unused"}]);
    serde_json::from_value(value).unwrap()
}

/// An agent serving the built-in model as `tiny` for `tenants` (name,
/// spec, key); returns its base URL.
async fn start(tenants: Vec<(&str, Value, &str)>) -> String {
    let spec_ = ModelSpec {
        name: "tiny".into(),
        dir: builtin_dir(),
        ..ModelSpec::default()
    };
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::load(&spec_).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut state = AppState::with(registry, Default::default(), None);
    state.peer_token = Some(Arc::from("peer-secret"));
    state.metrics_token = Some(Arc::from("scrape-secret"));
    state.tenants.replace(
        tenants
            .into_iter()
            .map(|(name, s, key)| Tenant::new(name, spec(s), [key]))
            .collect(),
    );
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}

fn chat(content: &str) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}],
           "max_tokens": 2, "temperature": 0})
}

async fn post(base: &str, headers: &[(&str, &str)], body: &Value) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    (status, body["error"].clone())
}

#[tokio::test]
async fn keys_models_limits_and_the_peer_token() {
    let base = start(vec![
        (
            "team-a",
            json!({"models": ["tiny"], "limits": {"requestsPerMinute": 3}}),
            "sk-a",
        ),
        ("team-b", json!({"models": ["other"]}), "sk-b"),
    ])
    .await;

    // No key, a wrong key: 401 invalid_api_key.
    for headers in [vec![], vec![("authorization", "Bearer sk-nope")]] {
        let (status, error) = error_of(post(&base, &headers, &chat("hi")).await).await;
        assert_eq!(status, 401);
        assert_eq!(error["code"], "invalid_api_key");
        assert_eq!(error["type"], "authentication_error");
    }

    // A model the key may not use: 403 model_not_allowed.
    let b = [("authorization", "Bearer sk-b")];
    let (status, error) = error_of(post(&base, &b, &chat("hi")).await).await;
    assert_eq!(status, 403);
    assert_eq!(error["code"], "model_not_allowed");
    assert_eq!(error["type"], "permission_error");
    assert_eq!(error["param"], "model");

    // A client naming another tenant is still itself.
    let forged = [
        ("authorization", "Bearer sk-b"),
        ("x-weir-tenant", "team-a"),
        ("x-weir-forwarded", "1"),
    ];
    assert_eq!(post(&base, &forged, &chat("hi")).await.status(), 403);
    let wrong_token = [("x-weir-peer-token", "guess"), ("x-weir-tenant", "team-a")];
    assert_eq!(post(&base, &wrong_token, &chat("hi")).await.status(), 401);

    // Three requests a minute, each answer saying what is left.
    let a = [("authorization", "Bearer sk-a")];
    for left in ["2", "1"] {
        let r = post(&base, &a, &chat("count me")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), left);
        assert!(header(&r, "x-ratelimit-reset-requests").ends_with('s'));
    }
    // A peer with the token speaks for team-a, and counts against it.
    let peer = [
        ("x-weir-peer-token", "peer-secret"),
        ("x-weir-tenant", "team-a"),
    ];
    let r = post(&base, &peer, &chat("count me")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let r = post(&base, &a, &chat("count me")).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((50..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let (_, error) = error_of(r).await;
    assert_eq!(error["code"], "rate_limit_exceeded");

    // /metrics needs its token; the rejections are there by tenant.
    let open = reqwest::get(format!("{base}/metrics")).await.unwrap();
    assert_eq!(open.status(), 401);
    let text = reqwest::Client::new()
        .get(format!("{base}/metrics"))
        .bearer_auth("scrape-secret")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"weir_tenant_rejections_total{tenant="team-a",reason="requests"} 1"#,
        r#"weir_tenant_rejections_total{tenant="team-b",reason="model_not_allowed"} 2"#,
        r#"weir_tenant_requests_total{tenant="team-a",reason="success"} 3"#,
        "weir_tenant_limits_fallback 0",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(!text.contains("sk-a"), "no key in the metrics");
}

#[tokio::test]
async fn cache_entries_are_shared_only_between_sharing_tenants() {
    let base = start(vec![
        ("own-1", json!({}), "k1"),
        ("own-2", json!({}), "k2"),
        ("share-1", json!({"shareCache": true}), "k3"),
        ("share-2", json!({"shareCache": true}), "k4"),
    ])
    .await;
    let ask = |key: &'static str| {
        let base = base.clone();
        async move {
            let auth = format!("Bearer {key}");
            let r = post(&base, &[("authorization", &auth)], &chat("same question")).await;
            assert_eq!(r.status(), 200);
            header(&r, "x-weir-cache")
        }
    };
    assert_eq!(ask("k1").await, "miss");
    assert_eq!(ask("k1").await, "l1", "a tenant hits its own entry");
    assert_eq!(ask("k2").await, "miss", "never another tenant's");
    assert_eq!(ask("k3").await, "miss", "nor a non-sharing one's");
    assert_eq!(ask("k4").await, "l1", "sharing tenants share");
}
