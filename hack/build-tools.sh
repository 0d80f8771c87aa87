#!/usr/bin/env bash
# Builds the test ground's Go binaries (kube-apiserver, kubectl, etcd) from the
# Go module proxy and caches them under a key made of go.mod + go.sum, so a warm
# run is a directory lookup. Prints the directory that holds the binaries.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod="$here/tools/kube"
cache="${KUBENOVA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubenova}"
key=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)
out="$cache/bin/$key"
if [ -x "$out/kube-apiserver" ] && [ -x "$out/kubectl" ] && [ -x "$out/etcd" ]; then
  echo "$out"; exit 0
fi
[ -x /usr/local/go/bin/go ] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "error: 'go' is not on PATH; install Go >= 1.26 (see README)" >&2; exit 1; }
kver=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$mod/go.mod")
[ -n "$kver" ] || { echo "error: cannot read the k8s.io/kubernetes version from $mod/go.mod" >&2; exit 1; }
major=${kver#v}; minor=${major#*.}; major=${major%%.*}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$kver -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
tmp="$out.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
cd "$mod"
echo "building kube-apiserver, kubectl $kver and etcd (cold build takes minutes)..." >&2
go build -trimpath -ldflags "$ldflags" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver >&2
go build -trimpath -ldflags "$ldflags" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl >&2
go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3 >&2
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "$out"
