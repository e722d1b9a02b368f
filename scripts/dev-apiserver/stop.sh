#!/usr/bin/env bash
# Stops what start.sh started. Usage: scripts/dev-apiserver/stop.sh [DIR]
SELF=$(cd "$(dirname "$0")" && pwd)
H=$(realpath -m "${1:-$SELF/../../target/dev-apiserver}")
for p in apiserver etcd; do [ -f "$H/run/$p.pid" ] && kill "$(cat "$H/run/$p.pid")" 2>/dev/null; done
true
