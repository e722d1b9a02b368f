#!/bin/bash
# Start etcd + crdserver from DIR (built by setup.sh). Usage: bash start.sh [DIR] [PORT]
set -euo pipefail
H=${1:-/tmp/apiserver-hunt/repro}; PORT=${2:-6443}; R=$H/run; mkdir -p "$R"
nohup "$H/bin/etcd" --data-dir "$R/etcd" --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
  --listen-peer-urls http://127.0.0.1:23801 > "$R/etcd.log" 2>&1 & echo $! > "$R/etcd.pid"
cat > "$R/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$PORT", insecure-skip-tls-verify: true}
users:
- name: anon
  user: {username: anonymous, password: anonymous}
contexts:
- name: local
  context: {cluster: local, user: anon}
current-context: local
KC
for i in $(seq 50); do curl -s http://127.0.0.1:23791/health | grep -q true && break; sleep 0.2; done
nohup "$H/bin/crdserver" --etcd-servers=http://127.0.0.1:23791 --secure-port=$PORT --bind-address=127.0.0.1 \
  --cert-dir="$R/certs" --kubeconfig="$R/kubeconfig" --enable-priority-and-fairness=false > "$R/crdserver.log" 2>&1 & echo $! > "$R/crdserver.pid"
for i in $(seq 100); do [ "$(curl -sk https://127.0.0.1:$PORT/readyz)" = ok ] && break; sleep 0.3; done
curl -sk https://127.0.0.1:$PORT/readyz; echo; echo "export KUBECONFIG=$R/kubeconfig"
