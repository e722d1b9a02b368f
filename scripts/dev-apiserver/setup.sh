#!/usr/bin/env bash
# Builds weir-dev-apiserver (upstream k8s.io/apiextensions-apiserver with
# this folder's main.go) and fetches etcd, from Debian unstable's packages
# only: the Go sources of the Kubernetes libraries are Architecture: all
# -dev packages. Nothing is installed into the system (private apt lists,
# `dpkg -x`); the build is offline in GOPATH mode.
# Usage: scripts/dev-apiserver/setup.sh [DIR]   (default target/dev-apiserver)
# About 300 MB of downloads and 5 minutes on 2 cores the first time.
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)
H=$(realpath -m "${1:-$SELF/../../target/dev-apiserver}")
mkdir -p "$H"/apt/{lists/partial,etc,cache/archives/partial,debs} "$H"/root "$H"/bin "$H"/gopath/src/weirapiserver
if [ ! -x "$H/root/usr/lib/go-1.27/bin/go" ]; then
  echo 'deb http://deb.debian.org/debian sid main' > "$H/apt/etc/sources.list"
  A="-o Dir::Etc::sourcelist=$H/apt/etc/sources.list -o Dir::Etc::sourceparts=/nonexistent -o Dir::State::Lists=$H/apt/lists -o Dir::Cache=$H/apt/cache"
  apt-get $A update
  apt-cache $A depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces --no-enhances \
    golang-k8s-apiextensions-apiserver-dev golang-k8s-apiserver-dev golang-k8s-client-go-dev \
    | grep -v '^ ' | grep -E '^golang-.*-dev$' | sort -u > "$H/apt/closure.txt"
  echo "$(wc -l < "$H/apt/closure.txt") Go source packages"
  (cd "$H/apt/debs" && apt-get $A download $(cat "$H/apt/closure.txt") golang-1.27-go golang-1.27-src etcd-server)
  for f in "$H"/apt/debs/*.deb; do dpkg -x "$f" "$H/root"; done
  ln -sfn ../../share/go-1.27/src "$H/root/usr/lib/go-1.27/src"
fi
cp "$SELF/main.go" "$H/gopath/src/weirapiserver/main.go"
export PATH=$H/root/usr/lib/go-1.27/bin:$PATH GOROOT=$H/root/usr/lib/go-1.27
export GO111MODULE=off GOPATH=$H/gopath:$H/root/usr/share/gocode GOCACHE=$H/gocache GOTOOLCHAIN=local GOFLAGS= GOPROXY=off
go build -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=v1.36.4 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36" \
  -o "$H/bin/weir-dev-apiserver" weirapiserver
cp "$H/root/usr/bin/etcd" "$H/bin/"
ls -la "$H/bin"
