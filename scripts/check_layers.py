#!/usr/bin/env python3
"""Checks the crate layering rules of issue 13.

* No cycle among the top-level modules of agent/src or operator/src: a
  `use crate::X` or `crate::X::` reference from a file in top-level module A
  to top-level module X (X != A) is an edge A -> X.
* No file under agent/src outside the HTTP layer (agent/src/http/) names
  axum.
Exits non-zero and says why when a rule is broken.
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HTTP_LAYER = "http"


def top_module(src: Path, f: Path) -> str:
    rel = f.relative_to(src)
    return rel.parts[0].removesuffix(".rs")


def crate_refs(text: str):
    """Top-level modules named after `crate::`, including `use crate::{a, b}`."""
    text = re.sub(r"//[^\n]*", "", text)
    for m in re.finditer(r"\bcrate::(\{[^}]*\}|\w+)", text):
        part = m.group(1)
        if part.startswith("{"):
            for name in re.findall(r"(?:^|[{,])\s*(\w+)", part):
                yield name
        else:
            yield part


def graph(src: Path):
    edges = {}
    for f in sorted(src.rglob("*.rs")):
        a = top_module(src, f)
        if a in ("lib", "main"):
            continue
        for b in crate_refs(f.read_text()):
            known = (src / b).is_dir() or (src / f"{b}.rs").exists()
            if b != a and known:
                edges.setdefault(a, {}).setdefault(b, f.relative_to(ROOT))
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    nodes = set(edges) | {w for ws in edges.values() for w in ws}
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def main():
    failed = False
    for crate in ("agent/src", "operator/src"):
        src = ROOT / crate
        edges = graph(src)
        for comp in cycles(edges):
            failed = True
            print(f"{crate}: import cycle among {', '.join(comp)}")
            for a in comp:
                for b, where in sorted(edges.get(a, {}).items()):
                    if b in comp:
                        print(f"    {a} -> {b}  ({where})")
    agent = ROOT / "agent/src"
    for f in sorted(agent.rglob("*.rs")):
        if top_module(agent, f) == HTTP_LAYER:
            continue
        if re.search(r"\baxum\b", re.sub(r"//[^\n]*", "", f.read_text())):
            failed = True
            print(f"{f.relative_to(ROOT)}: names axum outside agent/src/{HTTP_LAYER}/")
    if failed:
        sys.exit(1)
    print("layers: no import cycles; axum only in the HTTP layer")


if __name__ == "__main__":
    main()
