#!/bin/bash
# Build a CRD-serving Kubernetes API server (upstream k8s.io/apiextensions-apiserver v0.36.4 + etcd 3.5.30)
# entirely from Debian *unstable* binary packages (.deb, Architecture: all Go source + Go 1.27 toolchain),
# WITHOUT installing anything into the system (private apt lists, dpkg -x into $H/root).
# Usage: bash setup.sh [DIR]   (DIR defaults to /tmp/apiserver-hunt/repro); needs crdserver-main.go next to this script.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)
H=${1:-/tmp/apiserver-hunt/repro}
mkdir -p "$H"/apt/{lists/partial,etc,cache/archives/partial,debs} "$H"/root "$H"/bin "$H"/gopath/src/crdserver
echo 'deb http://deb.debian.org/debian sid main' > "$H/apt/etc/sources.list"
A="-o Dir::Etc::sourcelist=$H/apt/etc/sources.list -o Dir::Etc::sourceparts=/nonexistent -o Dir::State::Lists=$H/apt/lists -o Dir::Cache=$H/apt/cache"
apt-get $A update
apt-cache $A depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
  golang-k8s-apiextensions-apiserver-dev golang-k8s-apiserver-dev golang-k8s-client-go-dev \
  | grep -v '^ ' | grep -E '^golang-.*-dev$' | sort -u > "$H/apt/closure.txt"
echo "$(wc -l < "$H/apt/closure.txt") Go source packages"
(cd "$H/apt/debs" && apt-get $A download $(cat "$H/apt/closure.txt") golang-1.27-go golang-1.27-src etcd-server etcd-client)
for f in "$H"/apt/debs/*.deb; do dpkg -x "$f" "$H/root"; done
ln -sfn ../../share/go-1.27/src "$H/root/usr/lib/go-1.27/src"
cp "$SELF/crdserver-main.go" "$H/gopath/src/crdserver/main.go"
export PATH=$H/root/usr/lib/go-1.27/bin:$PATH GOROOT=$H/root/usr/lib/go-1.27
export GO111MODULE=off GOPATH=$H/gopath:$H/root/usr/share/gocode GOCACHE=$H/gocache GOTOOLCHAIN=local GOFLAGS= GOPROXY=off
go version
go build -ldflags "-X k8s.io/component-base/version.gitVersion=v1.36.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36" -o "$H/bin/crdserver" crdserver
cp "$H/root/usr/bin/etcd" "$H/root/usr/bin/etcdctl" "$H/bin/"
ls -la "$H/bin"
