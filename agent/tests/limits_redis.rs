//! Tenant limits against a real `redis-server` over TCP: two limiters (two
//! agents) share one count exactly; unused tokens come back through the
//! release script; a running slot is freed at release; with Redis killed
//! both count locally against `limit / replicas` at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_agent::tenants::limits::{Limiter, Reason};
use weir_crds::tenant::TenantLimits;
use weir_e2e::process::{Redis, free_port};

/// Waits until `check` holds (release runs in a spawned task).
async fn eventually(mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn two_agents_share_exact_limits_in_redis() {
    let port = free_port();
    let redis = Redis::start_on(port);
    let url = format!("redis://127.0.0.1:{port}");
    let agents = [
        Limiter::new(Some(url.clone()), "t:"),
        Limiter::new(Some(url), "t:"),
    ];
    let team: Arc<str> = "team".into();

    // 10 requests a minute between both agents.
    let rpm = TenantLimits {
        requests_per_minute: Some(10),
        ..Default::default()
    };
    let mut admitted = 0;
    for i in 0..25 {
        match agents[i % 2].admit(&team, &rpm, 1, 2).await {
            Ok(g) => {
                admitted += 1;
                assert_eq!(g.usage.requests.unwrap().remaining, 10 - admitted);
            }
            Err(refused) => {
                assert_eq!(refused.reason, Reason::Requests);
                assert!(refused.retry_after > Duration::from_secs(55));
            }
        }
    }
    assert_eq!(admitted, 10);
    assert!(!agents[0].in_fallback() && !agents[1].in_fallback());

    // Tokens: 100 a minute; a request reserving 80 that used 30 gives 50 back.
    let tokens: Arc<str> = "tokens".into();
    let tpm = TenantLimits {
        tokens_per_minute: Some(100),
        concurrent_requests: Some(1),
        ..Default::default()
    };
    let mut grant = agents[0].admit(&tokens, &tpm, 80, 2).await.unwrap();
    let busy = agents[1].admit(&tokens, &tpm, 10, 2).await.unwrap_err();
    assert_eq!(
        busy.reason,
        Reason::Concurrency,
        "one at once, across agents"
    );
    grant.finish(30);
    drop(grant);
    eventually(async || match agents[1].admit(&tokens, &tpm, 70, 2).await {
        Ok(g) => {
            assert_eq!(g.usage.tokens.unwrap().remaining, 0);
            true
        }
        Err(_) => false,
    })
    .await;

    // Redis gone: each agent counts alone, 10 / 2 replicas.
    drop(redis);
    let fresh: Arc<str> = "fresh".into();
    for agent in &agents {
        let mut here = 0;
        while agent.admit(&fresh, &rpm, 1, 2).await.is_ok() {
            here += 1;
            assert!(here <= 5, "unbounded without Redis");
        }
        assert_eq!(here, 5);
        assert!(agent.in_fallback());
    }

    // Redis back on its port: counting returns to it once the breaker lets
    // a probe through (it was empty: a fresh tenant starts from zero).
    let _redis = Redis::start_on(port);
    let back: Arc<str> = "back".into();
    let deadline = Instant::now() + Duration::from_secs(10);
    for agent in &agents {
        loop {
            let admitted = agent.admit(&back, &rpm, 1, 2).await;
            if !agent.in_fallback() {
                let g = admitted.expect("Redis holds room for it");
                assert_eq!(g.usage.requests.unwrap().limit, 10, "the whole limit again");
                break;
            }
            assert!(Instant::now() < deadline, "never counted in Redis again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
