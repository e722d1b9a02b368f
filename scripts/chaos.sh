#!/usr/bin/env bash
# The chaos suite, one command: builds the agent and `weir-chaos`, then
# breaks agents on loopback on purpose (slow and silent clients, peers
# killed or stopped mid-request, Redis stopped and killed under load,
# overload at ten times capacity) and prints a table, one row a scenario.
# Exits non-zero if any scenario caught the agent misbehaving. Needs
# redis-server (scripts/test.sh installs it). Arguments pick scenarios by
# name: connections, killed, stopped, redis, overload.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --locked -p weir-agent -p weir-e2e --bin weir-agent --bin weir-chaos
export WEIR_E2E_AGENT_LOG=${WEIR_E2E_AGENT_LOG:-error}
exec "${CARGO_TARGET_DIR:-target}/debug/weir-chaos" "$@" 2> >(grep -v -e '^Weir agent serving' -e '^Try:' -e '^  curl' -e '^    -d' >&2)
