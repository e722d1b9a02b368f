//! Tenants across three agents as real processes sharing a real Redis
//! (standalone mode: Tenants in the `--config` file, keys in the Secrets
//! directory): a limit of 60 requests a minute admits exactly 60 of 200
//! requests spread over the agents; a tokens-per-minute limit holds the
//! same way; keys, forbidden models, a forged tenant header on a
//! "forwarded" request, a rotated key picked up without a restart, cache
//! isolation between tenants; and with Redis killed mid-run every request
//! is still answered, within the local fallback bound of `limit / 3` per
//! agent.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weir_e2e::process::{Agent, Redis, free_port};
use weir_engine::testmodel::{TinyModelSpec, write_tiny_model};

const PEER_TOKEN: &str = "e2e-peer-token";

fn tenant(name: &str, spec: &str) -> String {
    format!(
        "---\nkind: Tenant\nmetadata: {{name: {name}}}\nspec:\n  apiKeys: [{{name: keys, key: {name}}}]\n{spec}\n"
    )
}

/// The config file: the tiny model and the tenants (`extra` appended).
fn write_config(dir: &Path, model: &Path, extra: &str) {
    let mut text = format!(
        "kind: Model\nmetadata: {{name: tiny}}\nspec:\n  source: {{uri: 'file://{}'}}\n",
        model.display()
    );
    for (name, spec) in [
        ("limited", "  limits: {requestsPerMinute: 60}"),
        ("probe", "  models: ['*']"),
        ("narrow", "  models: [other]"),
        ("own-1", "  shareCache: false"),
        ("own-2", "  shareCache: false"),
        ("rotating", "  models: [tiny]"),
        ("fallback", "  limits: {requestsPerMinute: 30}"),
    ] {
        text.push_str(&tenant(name, spec));
    }
    text.push_str(extra);
    // Written whole, then renamed: a reload never reads half a file.
    let tmp = dir.join("weir.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join("weir.yaml")).unwrap();
}

fn write_key(dir: &Path, tenant: &str, key: &str) {
    let keys = dir.join("secrets/keys");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join(tenant), format!("{key}\n")).unwrap();
}

fn chat(content: &str) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": content}],
           "max_tokens": 1, "ignore_eos": true, "temperature": 0})
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn post(client: &reqwest::Client, url: &str, key: &str, body: &Value) -> Answer {
    post_with(
        client,
        url,
        &[("authorization", &format!("Bearer {key}"))],
        body,
    )
    .await
}

async fn post_with(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Answer {
    let mut request = client.post(format!("{url}/v1/chat/completions")).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let r = request.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let body = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
    }
}

/// `n` requests of tenant `key`, round robin over `urls`, 12 at a time.
async fn burst(urls: &[String], key: &str, n: usize) -> Vec<Answer> {
    let client = reqwest::Client::new();
    let mut answers = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, url, key) = (client.clone(), urls[i % urls.len()].clone(), key.to_owned());
        set.spawn(async move { post(&client, &url, &key, &chat(&format!("req {i}"))).await });
        if set.len() >= 12 {
            answers.push(set.join_next().await.unwrap().unwrap());
        }
    }
    while let Some(a) = set.join_next().await {
        answers.push(a.unwrap());
    }
    answers
}

fn admitted(answers: &[Answer]) -> usize {
    for a in answers {
        assert!(
            a.status == 200 || a.status == 429,
            "only 200 or 429: {} {}",
            a.status,
            a.body
        );
        if a.status == 429 {
            assert_eq!(a.body["error"]["code"], "rate_limit_exceeded");
            assert!(a.headers.contains_key("retry-after"));
        }
    }
    answers.iter().filter(|a| a.status == 200).count()
}

/// Waits until `key` gets `status` from `/v1/models` on every agent.
async fn wait_key(urls: &[String], key: &str, status: u16) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for url in urls {
        loop {
            let r = client
                .get(format!("{url}/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
            if r.status().as_u16() == status {
                break;
            }
            assert!(Instant::now() < deadline, "{url}: {key} never got {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_hold_across_three_agents_and_survive_redis() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    write_tiny_model(&model, &TinyModelSpec::llama()).unwrap();
    for name in ["limited", "probe", "narrow", "own-1", "own-2", "fallback"] {
        write_key(dir.path(), name, &format!("sk-{name}"));
    }
    write_key(dir.path(), "rotating", "sk-old");
    write_config(dir.path(), &model, "");
    let mut redis = Redis::start();
    let redis_url = redis.url();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let config = dir.path().join("weir.yaml");
    let secrets = dir.path().join("secrets");
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let mut args = vec![
                "--config",
                config.to_str().unwrap(),
                "--secrets-dir",
                secrets.to_str().unwrap(),
                "--limits-redis-url",
                &redis_url,
                "--peer-token",
                PEER_TOKEN,
            ];
            for (j, url) in urls.iter().enumerate() {
                if j != i {
                    args.extend(["--peer", url.as_str()]);
                }
            }
            Agent::start_on(ports[i], &args)
        })
        .collect();
    let client = reqwest::Client::new();

    // 60 a minute: 200 requests over three agents, exactly 60 admitted.
    let answers = burst(&urls, "sk-limited", 200).await;
    assert_eq!(admitted(&answers), 60, "requests per minute across agents");

    // Tokens per minute: room for exactly ten requests of P + 1 tokens.
    let probe = post(&client, &urls[0], "sk-probe", &chat("req 0")).await;
    assert_eq!(probe.status, 200, "{}", probe.body);
    let cost = probe.body["usage"]["total_tokens"].as_u64().unwrap();
    let tpm = 10 * cost + cost / 2;
    write_key(dir.path(), "tokens", "sk-tokens");
    write_config(
        dir.path(),
        &model,
        &tenant("tokens", &format!("  limits: {{tokensPerMinute: {tpm}}}")),
    );
    wait_key(&urls, "sk-tokens", 200).await;
    let answers = burst(&urls, "sk-tokens", 30).await;
    assert_eq!(admitted(&answers), 10, "tokens per minute across agents");
    let last = answers.iter().find(|a| a.status == 429).unwrap();
    assert_eq!(
        last.headers["x-ratelimit-limit-tokens"].to_str().unwrap(),
        tpm.to_string()
    );

    // Keys and models.
    assert_eq!(
        post(&client, &urls[1], "sk-nobody", &chat("x"))
            .await
            .status,
        401
    );
    let narrow = post(&client, &urls[1], "sk-narrow", &chat("x")).await;
    assert_eq!(narrow.status, 403);
    assert_eq!(narrow.body["error"]["code"], "model_not_allowed");

    // A client posing as a forwarding peer for an unlimited tenant is
    // still the limited tenant its key names, or nobody without a key.
    let forged = [
        ("authorization", "Bearer sk-limited"),
        ("x-weir-forwarded", "1"),
        ("x-weir-tenant", "probe"),
    ];
    assert_eq!(
        post_with(&client, &urls[2], &forged, &chat("x"))
            .await
            .status,
        429
    );
    let forged = [
        ("x-weir-forwarded", "1"),
        ("x-weir-tenant", "probe"),
        ("x-weir-peer-token", "not-the-token"),
    ];
    assert_eq!(
        post_with(&client, &urls[2], &forged, &chat("x"))
            .await
            .status,
        401
    );

    // Through a front agent that serves another model: the request is
    // forwarded with the peer token and its tenant, refused or answered by
    // the agent that serves it, the limit headers passed back.
    let front_config = dir.path().join("front.yaml");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "metadata: {name: tiny}",
        "metadata: {name: front}",
        1,
    );
    std::fs::write(&front_config, text).unwrap();
    let mut args = vec![
        "--config",
        front_config.to_str().unwrap(),
        "--secrets-dir",
        secrets.to_str().unwrap(),
        "--peer-token",
        PEER_TOKEN,
    ];
    for url in &urls {
        args.extend(["--peer", url.as_str()]);
    }
    let front = Agent::start(&args);
    let deadline = Instant::now() + Duration::from_secs(20);
    let via = loop {
        let a = post(&client, &front.url, "sk-limited", &chat("via the front")).await;
        if a.status != 503 && a.status != 404 {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "front never reached a peer: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(via.status, 429, "{}", via.body);
    assert_eq!(via.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(
        post(&client, &front.url, "sk-probe", &chat("via"))
            .await
            .status,
        200
    );
    assert_eq!(
        post(&client, &front.url, "sk-narrow", &chat("via"))
            .await
            .status,
        403
    );
    drop(front);

    // A rotated key: the new one works and the old one stops, no restart.
    wait_key(&urls, "sk-old", 200).await;
    write_key(dir.path(), "rotating", "sk-new");
    wait_key(&urls, "sk-new", 200).await;
    wait_key(&urls, "sk-old", 401).await;

    // The same question from two tenants that do not share.
    let cache = |a: &Answer| a.headers["x-weir-cache"].to_str().unwrap().to_owned();
    let q = json!({"model": "tiny", "messages": [{"role": "user", "content": "same"}],
                   "max_tokens": 2, "temperature": 0});
    assert_eq!(
        cache(&post(&client, &urls[0], "sk-own-1", &q).await),
        "miss"
    );
    assert_eq!(cache(&post(&client, &urls[0], "sk-own-1", &q).await), "l1");
    assert_eq!(
        cache(&post(&client, &urls[0], "sk-own-2", &q).await),
        "miss"
    );

    // Redis killed mid-run: every request is answered, and each agent
    // admits at most its share (30 / 3) of the limit.
    let before = admitted(&burst(&urls, "sk-fallback", 6).await);
    assert_eq!(before, 6);
    redis.kill();
    let answers = burst(&urls, "sk-fallback", 90).await;
    let during = admitted(&answers);
    assert!(
        (10..=30).contains(&during),
        "{during} admitted without Redis; the bound is 3 x 10"
    );
    for url in &urls {
        assert_eq!(
            metric(url, "weir_tenant_limits_fallback").await,
            1.0,
            "{url}"
        );
    }
    drop(agents);
}
