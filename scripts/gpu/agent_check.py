#!/usr/bin/env python3
"""Step f of scripts/gpu-check.sh: a running weir-agent serves the OpenAI API
from the GPU. The shell starts and stops the agent; this script only talks
to it (standard library only: the GPU machine may have no curl).

Checks, all needed for PASS:
  * GET /health answers 200 within --wait seconds (status 3 if the agent
    process ends first, so the shell can retry with other flags);
  * the agent's log says the CUDA backend is used: `backend=cuda`,
    `backend="cuda"`, `"backend":"cuda"` or `backend: cuda`;
  * POST /v1/chat/completions (max_tokens 16) answers 200 with one choice
    whose message content is a string;
  * the same with "stream": true answers 200 with SSE `data:` chunks and
    ends with `data: [DONE]`.
Writes the figures to --out; the last stdout line is "RESULT: PASS|FAIL ...".
"""
import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request

ANSI = re.compile(r"\x1b\[[0-9;]*m")
CUDA = re.compile(r"""backend["']?\s*[=:]\s*["']?cuda\b""")
CPU = re.compile(r"""backend["']?\s*[=:]\s*["']?cpu\b""")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--pid", type=int, required=True, help="the agent's process id")
    p.add_argument("--log", required=True, help="the agent's log file")
    p.add_argument("--wait", type=float, default=120, help="seconds to wait for /health")
    p.add_argument("--out", required=True)
    return p.parse_args()


def alive(pid):
    """False once the process is gone or a zombie (the shell has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def log_text(path):
    try:
        with open(path, errors="replace") as f:
            return ANSI.sub("", f.read())
    except FileNotFoundError:
        return ""


def post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def wait_health(args, res):
    t0 = time.time()
    last = "no answer"
    while time.time() - t0 < args.wait:
        if not alive(args.pid):
            tail = " | ".join(log_text(args.log).strip().splitlines()[-3:])
            res["failures"].append(f"the agent exited before /health answered: {tail[-300:]}")
            return 3
        try:
            with urllib.request.urlopen(args.url + "/health", timeout=2) as r:
                if r.status == 200:
                    res["health_seconds"] = round(time.time() - t0, 1)
                    return 0
                last = f"status {r.status}"
        except urllib.error.HTTPError as e:
            last = f"status {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.5)
    res["failures"].append(f"/health did not answer 200 within {args.wait:.0f}s ({last})")
    return 1


def chat(args, res):
    body = {"model": args.model, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Hello from the GPU check"}]}
    t = time.time()
    try:
        with post(args.url + "/v1/chat/completions", body) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    res["chat_seconds"] = round(time.time() - t, 2)
    res["chat_status"] = status
    if status != 200:
        res["failures"].append(f"chat: status {status}: {text[:200]}")
        return
    try:
        obj = json.loads(text)
        choice = obj["choices"][0]
        content = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        res["failures"].append(f"chat: unexpected body ({e}): {text[:200]}")
        return
    if not isinstance(content, str):
        res["failures"].append(f"chat: message content is {type(content).__name__}")
    res["chat_finish_reason"] = choice.get("finish_reason")
    res["chat_usage"] = obj.get("usage")
    res["chat_content"] = content if isinstance(content, str) else None


def stream(args, res):
    body = {"model": args.model, "max_tokens": 16, "stream": True,
            "messages": [{"role": "user", "content": "Hello from the GPU check"}]}
    t = time.time()
    data, first = [], None
    try:
        with post(args.url + "/v1/chat/completions", body) as r:
            res["stream_status"] = r.status
            for raw in r:
                line = raw.decode(errors="replace").strip()
                if line.startswith("data:"):
                    if first is None:
                        first = time.time() - t
                    data.append(line[5:].strip())
    except urllib.error.HTTPError as e:
        res["stream_status"] = e.code
        res["failures"].append(f"stream: status {e.code}: {e.read().decode(errors='replace')[:200]}")
        return
    res["stream_seconds"] = round(time.time() - t, 2)
    res["stream_first_chunk_seconds"] = None if first is None else round(first, 3)
    res["stream_chunks"] = len(data)
    if not data or data[-1] != "[DONE]":
        res["failures"].append(f"stream: {len(data)} data lines, last {data[-1][:80] if data else None!r}, not [DONE]")
        return
    text = []
    for chunk in data[:-1]:
        try:
            obj = json.loads(chunk)
        except ValueError:
            res["failures"].append(f"stream: a chunk is not JSON: {chunk[:80]}")
            return
        if "error" in obj:
            res["failures"].append(f"stream: error chunk: {chunk[:200]}")
            return
        for c in obj.get("choices", []):
            text.append((c.get("delta") or {}).get("content") or "")
    res["stream_content"] = "".join(text)


def main():
    args = parse_args()
    res = {"model": args.model, "failures": []}
    rc = wait_health(args, res)
    if rc == 0:
        chat(args, res)
        stream(args, res)
        log = log_text(args.log)
        res["backend_cuda_logged"] = bool(CUDA.search(log))
        res["backend_cpu_logged"] = bool(CPU.search(log))
        if not res["backend_cuda_logged"]:
            cpu = " (it says backend cpu)" if res["backend_cpu_logged"] else ""
            res["failures"].append(f"the agent's log does not say backend=cuda{cpu}")
        rc = 1 if res["failures"] else 0
    res["pass"] = rc == 0
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    if rc == 0:
        detail = (f"health after {res['health_seconds']}s, backend=cuda, chat {res['chat_seconds']}s "
                  f"({res.get('chat_finish_reason')}), stream {res['stream_chunks']} chunks ending [DONE]")
        print(f"RESULT: PASS {detail}", flush=True)
    else:
        print(f"RESULT: FAIL {'; '.join(res['failures'])}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
