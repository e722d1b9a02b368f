#!/usr/bin/env bash
# Starts etcd and weir-dev-apiserver from DIR (built by setup.sh), installs
# the stand-in kinds (crds.json) and writes DIR/run/kubeconfig.
# Usage: scripts/dev-apiserver/start.sh [DIR] [PORT]; stop with stop.sh.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)
H=$(realpath -m "${1:-$SELF/../../target/dev-apiserver}"); PORT=${2:-6443}; R=$H/run
rm -rf "$R"; mkdir -p "$R"
nohup "$H/bin/etcd" --data-dir "$R/etcd" --listen-client-urls http://127.0.0.1:23791 \
  --advertise-client-urls http://127.0.0.1:23791 --listen-peer-urls http://127.0.0.1:23801 \
  > "$R/etcd.log" 2>&1 & echo $! > "$R/etcd.pid"
cat > "$R/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: dev
  cluster: {server: "https://127.0.0.1:$PORT", insecure-skip-tls-verify: true}
users:
- name: dev
  user: {username: dev, password: dev}
contexts:
- name: dev
  context: {cluster: dev, user: dev}
current-context: dev
KC
for _ in $(seq 50); do curl -s http://127.0.0.1:23791/health | grep -q true && break; sleep 0.2; done
nohup "$H/bin/weir-dev-apiserver" --etcd-servers=http://127.0.0.1:23791 --secure-port="$PORT" \
  --bind-address=127.0.0.1 --cert-dir="$R/certs" --kubeconfig="$R/kubeconfig" \
  --enable-priority-and-fairness=false > "$R/apiserver.log" 2>&1 & echo $! > "$R/apiserver.pid"
for _ in $(seq 100); do [ "$(curl -sk "https://127.0.0.1:$PORT/readyz")" = ok ] && break; sleep 0.3; done
[ "$(curl -sk "https://127.0.0.1:$PORT/readyz")" = ok ] || { cat "$R/apiserver.log"; exit 1; }
# The stand-in kinds, applied with the server's own API (no kubectl needed).
python3 - "$PORT" "$SELF/crds.json" <<'PY'
import json, ssl, sys, urllib.request
port, path = sys.argv[1], sys.argv[2]
ctx = ssl._create_unverified_context()
for crd in json.load(open(path)):
    req = urllib.request.Request(
        f"https://127.0.0.1:{port}/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
        data=json.dumps(crd).encode(), headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, context=ctx)
PY
sleep 2
echo "export KUBECONFIG=$R/kubeconfig"
