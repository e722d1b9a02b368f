//! The rest of the OpenAI surface over real HTTP on a loopback socket,
//! serving the built-in model: `GET /v1/models/{id}`, `/tokenize` and
//! `/detokenize`, `POST /v1/responses` (JSON and streamed), and
//! completions with `echo` and prompt log probabilities; the first three
//! also for a model only a peer serves.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::{Value, json};
use weir_agent::http::{AppState, router};
use weir_agent::models::{ModelRegistry, ModelSpec, ServedModel, ensure_builtin};
use weir_agent::route::peers::Peer;

fn builtin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("weir-agent-surface-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        ensure_builtin(&root).unwrap()
    })
    .clone()
}

/// Starts an agent serving the built-in model under each of `names`;
/// returns its base URL.
async fn start(names: &[&str]) -> String {
    start_with_peer(names, None).await
}

/// As [`start`], knowing a peer (URL, the models it serves).
async fn start_with_peer(names: &[&str], peer: Option<(&str, &[&str])>) -> String {
    let mut registry = ModelRegistry::default();
    for name in names {
        let spec = ModelSpec {
            name: (*name).into(),
            dir: builtin_dir(),
            engine: Default::default(),
            cache: Default::default(),
            batch: Default::default(),
            redis_url: None,
        };
        registry.insert(ServedModel::load(&spec).unwrap());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(registry);
    if let Some((url, models)) = peer {
        state.peers.upsert(Peer {
            url: url.to_owned(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            ready: true,
        });
    }
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    format!("http://{addr}")
}

async fn post(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The `data:` JSON of each event of an SSE body, with its `event:` name.
async fn sse(resp: reqwest::Response) -> Vec<(String, Value)> {
    let body = resp.text().await.unwrap();
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let mut name = String::new();
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_owned();
            } else if let Some(d) = line.strip_prefix("data: ")
                && d != "[DONE]"
            {
                out.push((name.clone(), serde_json::from_str(d).unwrap()));
            }
        }
    }
    out
}

fn assert_param(body: &Value, param: &str) {
    assert_eq!(body["error"]["param"], param, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_retrieved_by_id_even_with_a_slash() {
    let base = start(&["tiny", "org/tiny"]).await;
    let (status, card) = get(&base, "/v1/models/tiny").await;
    assert_eq!(status, 200, "{card}");
    assert_eq!(card["id"], "tiny");
    assert_eq!(card["object"], "model");
    assert_eq!(card["owned_by"], "weir");
    let (_, list) = get(&base, "/v1/models").await;
    let listed = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "tiny")
        .unwrap();
    assert_eq!(&card, listed);
    for path in ["/v1/models/org/tiny", "/v1/models/org%2Ftiny"] {
        let (status, card) = get(&base, path).await;
        assert_eq!(status, 200, "{path}: {card}");
        assert_eq!(card["id"], "org/tiny");
    }
    let (status, err) = get(&base, "/v1/models/nope").await;
    assert_eq!(status, 404);
    assert_eq!(err["error"]["code"], "model_not_found");
    assert_eq!(err["error"]["type"], "not_found_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_and_detokenize_round_trip_and_count_as_generation_does() {
    let base = start(&["tiny"]).await;
    let text = "The cache holds answers";
    let (status, t) = post(
        &base,
        "/tokenize",
        &json!({"model": "tiny", "prompt": text}),
    )
    .await;
    assert_eq!(status, 200, "{t}");
    let tokens = t["tokens"].as_array().unwrap().clone();
    assert!(!tokens.is_empty());
    assert_eq!(t["count"], tokens.len());
    assert!(t["max_model_len"].as_u64().unwrap() > 0);
    let (status, d) = post(
        &base,
        "/detokenize",
        &json!({"model": "tiny", "tokens": tokens}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert!(d["prompt"].as_str().unwrap().contains(text), "{d}");
    // The count agrees with what a completion and a chat are billed.
    let (_, c) = post(
        &base,
        "/v1/completions",
        &json!({"model": "tiny", "prompt": text, "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(c["usage"]["prompt_tokens"], t["count"]);
    let messages =
        json!([{"role": "system", "content": "Be brief"}, {"role": "user", "content": text}]);
    let (status, m) = post(
        &base,
        "/tokenize",
        &json!({"model": "tiny", "messages": messages}),
    )
    .await;
    assert_eq!(status, 200, "{m}");
    let (_, chat) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": messages, "max_tokens": 1, "temperature": 0}),
    )
    .await;
    assert_eq!(chat["usage"]["prompt_tokens"], m["count"]);
    let (_, without) = post(
        &base,
        "/tokenize",
        &json!({"model": "tiny", "messages": messages, "add_generation_prompt": false}),
    )
    .await;
    assert!(without["count"].as_u64() <= m["count"].as_u64());
    let (_, strs) = post(
        &base,
        "/tokenize",
        &json!({"model": "tiny", "prompt": text, "return_token_strs": true}),
    )
    .await;
    assert_eq!(strs["token_strs"].as_array().unwrap().len(), tokens.len());
    // Bad input: a token outside the vocabulary, neither form, no model.
    let (status, e) = post(
        &base,
        "/detokenize",
        &json!({"model": "tiny", "tokens": [1, 99999999]}),
    )
    .await;
    assert_eq!(status, 400);
    assert_param(&e, "tokens");
    assert!(e["error"]["message"].as_str().unwrap().contains("99999999"));
    let (status, e) = post(&base, "/tokenize", &json!({"model": "tiny"})).await;
    assert_eq!(status, 400);
    assert_param(&e, "prompt");
    let (status, e) = post(
        &base,
        "/tokenize",
        &json!({"model": "ghost", "prompt": "x"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    let (status, e) = post(
        &base,
        "/detokenize",
        &json!({"model": "tiny", "tokens": "abc"}),
    )
    .await;
    assert_eq!(status, 422, "{e}");
}

fn response_text(r: &Value) -> String {
    r["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().clone())
        .filter_map(|p| p["text"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_answer_as_chat_does_in_json_and_as_events() {
    let base = start(&["tiny"]).await;
    let request = json!({"model": "tiny", "instructions": "Be brief", "input": "Hello there",
        "max_output_tokens": 12, "temperature": 0});
    let (status, r) = post(&base, "/v1/responses", &request).await;
    assert_eq!(status, 200, "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(r["object"], "response");
    assert_eq!(r["model"], "tiny");
    assert!(r["created_at"].as_u64().unwrap() > 0);
    // The same greedy chat gives the same text and counts.
    let (_, chat) = post(
        &base,
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief"},
            {"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0}),
    )
    .await;
    let chat_text = chat["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(response_text(&r), chat_text);
    assert_eq!(r["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);
    assert_eq!(
        r["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
    let expected = if chat["choices"][0]["finish_reason"] == "length" {
        assert_eq!(r["incomplete_details"]["reason"], "max_output_tokens");
        "incomplete"
    } else {
        "completed"
    };
    assert_eq!(r["status"], expected);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/responses"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse(resp).await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    for (name, e) in &events {
        assert_eq!(
            name,
            e["type"].as_str().unwrap(),
            "event: line and type differ"
        );
    }
    let numbers: Vec<u64> = events
        .iter()
        .map(|(_, e)| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let deltas = kinds
        .iter()
        .filter(|k| **k == "response.output_text.delta")
        .count();
    assert!(deltas >= 1, "{kinds:?}");
    let head = [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    assert_eq!(&kinds[..4], head);
    let tail = [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        if expected == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        },
    ];
    assert_eq!(&kinds[kinds.len() - 4..], tail);
    assert_eq!(kinds.len(), 8 + deltas);
    let joined: String = events
        .iter()
        .filter(|(_, e)| e["type"] == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(joined, chat_text);
    let last = &events.last().unwrap().1["response"];
    assert_eq!(response_text(last), chat_text);
    assert_eq!(
        last["usage"]["output_tokens"],
        chat["usage"]["completion_tokens"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_refuse_what_a_stateless_server_cannot_do() {
    let base = start(&["tiny"]).await;
    let with = |key: &str, value: Value| {
        let mut r = json!({"model": "tiny", "input": "x", "max_output_tokens": 2});
        r[key] = value;
        r
    };
    for (key, value, param) in [
        ("store", json!(true), "store"),
        (
            "previous_response_id",
            json!("resp_123"),
            "previous_response_id",
        ),
        ("background", json!(true), "background"),
        ("tools", json!([{"type": "web_search"}]), "tools[0].type"),
        ("input", json!(42), "input"),
    ] {
        let (status, e) = post(&base, "/v1/responses", &with(key, value)).await;
        assert_eq!(status, 400, "{key}: {e}");
        assert_param(&e, param);
    }
    let (status, e) = post(
        &base,
        "/v1/responses",
        &json!({"model": "ghost", "input": "x"}),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    // Stateless on purpose is fine.
    let (status, r) = post(&base, "/v1/responses", &with("store", json!(false))).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["store"], false);
}

async fn completion_chunks(base: &str, body: &Value) -> Vec<Value> {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sse(resp).await.into_iter().map(|(_, e)| e).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_echo_the_prompt_and_score_it() {
    let base = start(&["tiny"]).await;
    let prompt = "The cache holds";
    let body = |extra: Value| {
        let mut b = json!({"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let (_, plain) = post(&base, "/v1/completions", &body(json!({"logprobs": 2}))).await;
    let generated = plain["choices"][0]["text"].as_str().unwrap();
    let (status, echoed) = post(
        &base,
        "/v1/completions",
        &body(json!({"echo": true, "logprobs": 2})),
    )
    .await;
    assert_eq!(status, 200, "{echoed}");
    let choice = &echoed["choices"][0];
    assert_eq!(choice["text"], format!("{prompt}{generated}"));
    let prompt_tokens = echoed["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let lp = &choice["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), prompt_tokens + 4);
    assert!(lp["token_logprobs"][0].is_null(), "{lp}");
    assert!(lp["top_logprobs"][0].is_null(), "{lp}");
    for k in 1..tokens.len() {
        assert!(
            lp["token_logprobs"][k].as_f64().unwrap() <= 0.0,
            "{k}: {lp}"
        );
        let top = lp["top_logprobs"][k].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{k}: {lp}");
    }
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), tokens.len());
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    // The completion's own tokens score as without echo. Echo scores every
    // prompt row, so the output projection runs as a many-row product
    // (gemm) instead of the one-row fused kernel: the same sums in another
    // order, equal to float rounding, not bit for bit.
    let tail = &lp["token_logprobs"].as_array().unwrap()[prompt_tokens..];
    let alone = plain["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(tail.len(), alone.len());
    for (k, (a, b)) in tail.iter().zip(alone).enumerate() {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{k}: {a} vs {b}");
    }

    // Prompt scoring only.
    let (status, scored) = post(
        &base,
        "/v1/completions",
        &body(json!({"echo": true, "logprobs": 1, "max_tokens": 0})),
    )
    .await;
    assert_eq!(status, 200, "{scored}");
    assert_eq!(scored["choices"][0]["text"], prompt);
    assert_eq!(scored["choices"][0]["finish_reason"], "length");
    assert_eq!(scored["usage"]["completion_tokens"], 0);
    let scored_lp = &scored["choices"][0]["logprobs"];
    assert_eq!(scored_lp["tokens"].as_array().unwrap().len(), prompt_tokens);
    assert_eq!(
        scored_lp["tokens"].as_array().unwrap()[..],
        tokens[..prompt_tokens]
    );
    let (status, e) = post(&base, "/v1/completions", &body(json!({"max_tokens": 0}))).await;
    assert_eq!(status, 400);
    assert_param(&e, "max_tokens");

    // Streamed: the first chunk carries the prompt and its scores.
    let chunks = completion_chunks(
        &base,
        &body(json!({"echo": true, "logprobs": 2, "stream": true})),
    )
    .await;
    assert_eq!(chunks[0]["choices"][0]["text"], prompt);
    assert!(chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0].is_null());
    assert_eq!(
        chunks[0]["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        prompt_tokens
    );
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(joined, choice["text"].as_str().unwrap());
    // Several prompts with several choices each: every choice starts with
    // its own prompt.
    let (status, many) = post(
        &base,
        "/v1/completions",
        &body(json!({"prompt": ["First one", "Second"], "echo": true, "n": 2})),
    )
    .await;
    assert_eq!(status, 200, "{many}");
    for (i, want) in ["First one", "First one", "Second", "Second"]
        .iter()
        .enumerate()
    {
        let text = many["choices"][i]["text"].as_str().unwrap();
        assert!(text.starts_with(want), "choice {i}: {text}");
    }
    let chunks = completion_chunks(
        &base,
        &body(json!({"echo": true, "stream": true, "n": 2, "seed": 1})),
    )
    .await;
    for index in 0..2 {
        let first = chunks
            .iter()
            .find(|c| c["choices"][0]["index"] == index)
            .unwrap();
        assert_eq!(first["choices"][0]["text"], prompt);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_model_is_retrieved_tokenized_and_answered_through_responses() {
    let holder = start(&["tiny"]).await;
    let front = start_with_peer(&["front"], Some((&holder, &["tiny"]))).await;
    let (status, card) = get(&front, "/v1/models/tiny").await;
    assert_eq!(status, 200, "{card}");
    assert_eq!(card["id"], "tiny");
    let body = json!({"model": "tiny", "prompt": "The cache holds answers"});
    let (status, here) = post(&front, "/tokenize", &body).await;
    assert_eq!(status, 200, "{here}");
    let (_, there) = post(&holder, "/tokenize", &body).await;
    assert_eq!(here, there);
    let tokens = json!({"model": "tiny", "tokens": there["tokens"]});
    let (status, text) = post(&front, "/detokenize", &tokens).await;
    assert_eq!(status, 200, "{text}");
    let request =
        json!({"model": "tiny", "input": "Hello there", "max_output_tokens": 6, "temperature": 0});
    let (status, relayed) = post(&front, "/v1/responses", &request).await;
    assert_eq!(status, 200, "{relayed}");
    let (_, direct) = post(&holder, "/v1/responses", &request).await;
    assert_eq!(response_text(&relayed), response_text(&direct));
    assert_eq!(relayed["usage"], direct["usage"]);
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{front}/v1/responses"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let events = sse(resp).await;
    let last = &events.last().unwrap().1;
    assert!(
        matches!(
            last["type"].as_str(),
            Some("response.completed" | "response.incomplete")
        ),
        "{last}"
    );
    assert_eq!(response_text(&last["response"]), response_text(&direct));
}
