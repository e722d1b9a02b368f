#!/usr/bin/env python3
"""The official `openai` Python SDK against a real weir-agent process.

Starts `weir-agent serve` (the built-in model) on a free loopback port, waits
for /ready, then drives it with the unchanged SDK: models, chat and
completions (plain and streaming with usage), n, seeds, logprobs, the
SDK's error types for bad requests, structured outputs and tool calls
(parse() with a Pydantic model, json_object, required and named tools
whole and streamed, a tool result sent back; the built-in model's weights
are random, so its constrained output is valid only because of the
grammar, which is what these checks show), and the rest of the surface
(models.retrieve, echo, the Responses API); then a second agent with
Tenants (keys from a Secrets directory) for the SDK's authentication,
permission and rate-limit errors and the `x-ratelimit-*` headers. Exits
non-zero on the first mismatch.

    python3 e2e/python/openai_sdk_check.py target/debug/weir-agent
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai
from openai import OpenAI
from pydantic import BaseModel, Field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"weir-agent exited early with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{base}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("weir-agent did not become ready")


def check(cond: bool, what: str) -> None:
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok  {what}")


def expect_error(kind, what, call) -> None:
    try:
        call()
    except kind as e:
        check(isinstance(e.body, dict) and "message" in e.body, f"{what} -> {kind.__name__} with an OpenAI error body")
        return
    except openai.APIError as e:  # a different error type
        sys.exit(f"FAILED: {what}: expected {kind.__name__}, got {type(e).__name__}: {e}")
    sys.exit(f"FAILED: {what}: no error")


def run(client: OpenAI) -> None:
    models = client.models.list()
    check(sorted(m.id for m in models.data) == ["weir-embed-tiny", "weir-tiny"],
          "models.list names the built-in generator and encoder")

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model="weir-tiny", messages=msgs, max_tokens=8, temperature=0)
    check(chat.object == "chat.completion" and chat.choices[0].message.role == "assistant", "chat completion shape")
    check(chat.choices[0].finish_reason in ("stop", "length"), "finish_reason")
    check(chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens, "usage adds up")

    stream = client.chat.completions.create(
        model="weir-tiny", messages=msgs, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
    check(text == chat.choices[0].message.content, "streamed text equals the non-streamed text (greedy)")
    check(usage is not None and usage.completion_tokens == chat.usage.completion_tokens, "stream usage chunk")

    many = client.chat.completions.create(model="weir-tiny", messages=msgs, max_tokens=4, n=2, seed=3, temperature=0.9)
    check(len(many.choices) == 2, "n=2 gives two choices")
    lp = client.chat.completions.create(model="weir-tiny", messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    check(len(content) == lp.usage.completion_tokens and len(content[0].top_logprobs) <= 2, "chat logprobs")

    comp = client.completions.create(model="weir-tiny", prompt="The cache", max_tokens=5, temperature=0)
    check(comp.object == "text_completion" and comp.usage.completion_tokens <= 5, "completion shape")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="weir-tiny", prompt="The cache", max_tokens=5, temperature=0, stream=True) if c.choices)
    check(streamed == comp.choices[0].text, "streamed completion equals the non-streamed one")

    # The SDK asks for base64 by default and decodes it; ask for floats too.
    emb = client.embeddings.create(model="weir-embed-tiny", input=["The cache", "The operator"])
    check(len(emb.data) == 2 and all(len(d.embedding) == 64 for d in emb.data), "embeddings shape")
    norms = [sum(x * x for x in d.embedding) ** 0.5 for d in emb.data]
    check(all(abs(n - 1) < 1e-4 for n in norms), "embeddings are unit vectors")
    floats = client.embeddings.create(model="weir-embed-tiny", input="The cache", encoding_format="float")
    check(max(abs(a - b) for a, b in zip(floats.data[0].embedding, emb.data[0].embedding)) < 1e-6,
          "float and base64 encodings agree")
    check(emb.usage.prompt_tokens == emb.usage.total_tokens > 0, "embeddings usage")
    expect_error(openai.BadRequestError, "embedding an empty list",
                 lambda: client.embeddings.create(model="weir-embed-tiny", input=[]))

    expect_error(openai.NotFoundError, "unknown model",
                 lambda: client.chat.completions.create(model="nope", messages=msgs))
    expect_error(openai.BadRequestError, "temperature out of range",
                 lambda: client.chat.completions.create(model="weir-tiny", messages=msgs, temperature=7))
    expect_error(openai.BadRequestError, "max_tokens beyond the context",
                 lambda: client.chat.completions.create(model="weir-tiny", messages=msgs, max_tokens=10**9))
    expect_error(openai.UnprocessableEntityError, "wrong field type",
                 lambda: client.chat.completions.create(model="weir-tiny", messages=msgs, extra_body={"n": "two"}))
    rest_of_surface(client)


def rest_of_surface(client: OpenAI) -> None:
    """models.retrieve, completions with echo (and prompt logprobs), and the
    stateless Responses API, plain and streamed."""
    card = client.models.retrieve("weir-tiny")
    check(card.id == "weir-tiny" and card.object == "model", "models.retrieve")
    expect_error(openai.NotFoundError, "models.retrieve of an unknown id",
                 lambda: client.models.retrieve("nope"))

    plain = client.completions.create(model="weir-tiny", prompt="The cache", max_tokens=4, temperature=0)
    echoed = client.completions.create(model="weir-tiny", prompt="The cache", max_tokens=4, temperature=0,
                                       echo=True, logprobs=2)
    check(echoed.choices[0].text == "The cache" + plain.choices[0].text, "echo puts the prompt first")
    lp = echoed.choices[0].logprobs
    n = echoed.usage.prompt_tokens + echoed.usage.completion_tokens
    check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n,
          "echo logprobs cover prompt and completion")
    check(lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:]),
          "the first prompt token has a null logprob, the others are log probabilities")
    scored = client.completions.create(model="weir-tiny", prompt="The cache", max_tokens=0, echo=True, logprobs=1)
    check(scored.choices[0].text == "The cache" and scored.usage.completion_tokens == 0,
          "max_tokens=0 with echo scores the prompt only")

    r = client.responses.create(model="weir-tiny", instructions="Be brief", input="Hello there",
                                max_output_tokens=12, temperature=0)
    chat = client.chat.completions.create(
        model="weir-tiny", max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hello there"}])
    check(r.object == "response" and r.id.startswith("resp_"), "responses.create shape")
    check(r.output_text == chat.choices[0].message.content, "responses.create answers as chat does (greedy)")
    check(r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens,
          "responses usage")
    check(r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed"),
          "responses status")

    events = list(client.responses.create(model="weir-tiny", instructions="Be brief", input="Hello there",
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    check(kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                        "response.content_part.added"], "responses stream opens in order")
    check(kinds[-1] in ("response.completed", "response.incomplete")
          and kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                               "response.output_item.done"], "responses stream closes in order")
    check([e.sequence_number for e in events] == list(range(len(events))), "sequence numbers count up")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check(deltas == r.output_text and events[-1].response.output_text == r.output_text,
          "streamed deltas join to the final text")
    expect_error(openai.BadRequestError, "responses with store=True",
                 lambda: client.responses.create(model="weir-tiny", input="x", store=True))
    expect_error(openai.BadRequestError, "responses with previous_response_id",
                 lambda: client.responses.create(model="weir-tiny", input="x", previous_response_id="resp_1"))


TENANTS = """
kind: Model
metadata: {{name: weir-tiny}}
spec:
  source: {{uri: 'file://{model}'}}
---
kind: Tenant
metadata: {{name: sdk}}
spec:
  apiKeys: [{{name: keys, key: sdk}}]
  models: [weir-tiny]
  limits: {{requestsPerMinute: 2}}
---
kind: Tenant
metadata: {{name: narrow}}
spec:
  apiKeys: [{{name: keys, key: narrow}}]
  models: [other]
"""


def run_tenants(binary: str, cache: str) -> None:
    """A tenant's key, a forbidden model and a rate limit, as the SDK sees them."""
    model = next(p for p in Path(cache).glob("builtin-*") if "encoder" not in p.name)
    keys = Path(cache) / "secrets" / "keys"
    keys.mkdir(parents=True)
    (keys / "sdk").write_text("sk-sdk\n")
    (keys / "narrow").write_text("sk-narrow\n")
    config = Path(cache) / "tenants.yaml"
    config.write_text(TENANTS.format(model=model))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--config", str(config),
         "--secrets-dir", str(Path(cache) / "secrets")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "RUST_LOG": "warn"},
    )
    try:
        wait_ready(base, proc, time.time() + 60)
        msgs = [{"role": "user", "content": "hi"}]
        ask = lambda key: OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0).chat.completions
        expect_error(openai.AuthenticationError, "an unknown API key",
                     lambda: ask("sk-nobody").create(model="weir-tiny", messages=msgs, max_tokens=1))
        expect_error(openai.PermissionDeniedError, "a model the key may not use",
                     lambda: ask("sk-narrow").create(model="weir-tiny", messages=msgs, max_tokens=1))
        raw = ask("sk-sdk").with_raw_response.create(model="weir-tiny", messages=msgs, max_tokens=1)
        check(raw.headers.get("x-ratelimit-limit-requests") == "2"
              and raw.headers.get("x-ratelimit-remaining-requests") == "1", "x-ratelimit headers")
        ask("sk-sdk").create(model="weir-tiny", messages=msgs, max_tokens=1)
        expect_error(openai.RateLimitError, "past the tenant's requests per minute",
                     lambda: ask("sk-sdk").create(model="weir-tiny", messages=msgs, max_tokens=1))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


def valid_weather_args(arguments: str) -> bool:
    args = json.loads(arguments)
    return (set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 12
            and args["unit"] in ("celsius", "fahrenheit"))


def run_structured(client: OpenAI) -> None:
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    parsed = client.chat.completions.parse(model="weir-tiny", messages=msgs, response_format=Person,
                                           max_tokens=200, temperature=0.9, seed=5)
    person = parsed.choices[0].message.parsed
    check(isinstance(person, Person) and len(person.name) <= 12 and 0 <= person.age <= 120,
          "chat.completions.parse(response_format=Person) returns a parsed Person")

    obj = client.chat.completions.create(model="weir-tiny", messages=msgs, max_tokens=200, seed=6,
                                         temperature=0.9, response_format={"type": "json_object"})
    check(isinstance(json.loads(obj.choices[0].message.content), dict), "json_object returns a JSON object")

    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model="weir-tiny", messages=ask, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=200, temperature=0.9, seed=7)
        calls = r.choices[0].message.tool_calls or []
        check(r.choices[0].finish_reason == "tool_calls" and len(calls) >= 1
              and all(c.function.name == "get_weather" and valid_weather_args(c.function.arguments) for c in calls),
              f"tool_choice={choice!r} returns tool_calls whose arguments fit the schema")

        stream = client.chat.completions.create(model="weir-tiny", messages=ask, tools=[WEATHER],
                                                tool_choice=choice, max_tokens=200, temperature=0.9, seed=7,
                                                stream=True)
        acc, finish = {}, None
        for chunk in stream:
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    call = acc.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                    call["id"] = call["id"] or d.id
                    if d.function and d.function.name:
                        call["name"] = d.function.name
                    if d.function and d.function.arguments:
                        call["arguments"] += d.function.arguments
        check(finish == "tool_calls" and acc and all(
            c["id"] and c["name"] == "get_weather" and valid_weather_args(c["arguments"]) for c in acc.values()),
              f"tool_choice={choice!r} streamed: accumulated deltas are a valid call")

    call = r.choices[0].message.tool_calls[0]
    followup = ask + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 3})},
    ]
    answer = client.chat.completions.create(model="weir-tiny", messages=followup, tools=[WEATHER],
                                            max_tokens=8, temperature=0)
    check(answer.choices[0].message.role == "assistant", "a tool result message round-trips")
    expect_error(openai.BadRequestError, "tool_choice naming a missing tool",
                 lambda: client.chat.completions.create(
                     model="weir-tiny", messages=ask, tools=[WEATHER],
                     tool_choice={"type": "function", "function": {"name": "nope"}}))


def main() -> None:
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/weir-agent"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cache:
        proc = subprocess.Popen(
            [binary, "serve", "--listen", f"127.0.0.1:{port}", "--model-cache", cache],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "RUST_LOG": "warn"},
        )
        try:
            wait_ready(base, proc, time.time() + 60)
            client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
            run(client)
            run_structured(client)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        run_tenants(binary, cache)
    print(f"openai SDK {openai.__version__}: all checks passed")


if __name__ == "__main__":
    main()
