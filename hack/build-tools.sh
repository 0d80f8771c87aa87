#!/usr/bin/env bash
# Builds the test ground's Go binaries from the Go module proxy and caches them under a key made of
# go.mod + go.sum, so a warm run is a directory lookup. Prints the directory that holds the binaries.
# Usage: hack/build-tools.sh [kube|node|storage]
#   kube (default): kube-apiserver, kubectl, etcd (every test ground)
#   node: kubelet, kube-scheduler, kube-controller-manager, kube-proxy (cluster mode only), from a
#         module of their own pinned to the same Kubernetes version, so kube's cache key never moves
#   storage: local-path-provisioner (cluster mode's storage class), a module of its own
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
set_=${1:-kube}
case "$set_" in
  kube) tools=(kube-apiserver kubectl etcd) ;;
  node) tools=(kubelet kube-scheduler kube-controller-manager kube-proxy) ;;
  storage) tools=(local-path-provisioner) ;;
  *) echo "usage: $0 [kube|node|storage]" >&2; exit 2 ;;
esac
mod="$here/tools/$set_"
cache="${KUBENOVA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubenova}"
key=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)
out="$cache/bin/$key"
built=1
for t in "${tools[@]}"; do [ -x "$out/$t" ] || built=0; done
if [ "$built" = 1 ]; then echo "$out"; exit 0; fi
[ -x /usr/local/go/bin/go ] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "error: 'go' is not on PATH; install Go >= 1.26 (see README)" >&2; exit 1; }
export GOTOOLCHAIN=local GOFLAGS="-mod=mod ${GOFLAGS:-}" CGO_ENABLED=0
tmp="$out.tmp.$$"
if [ "$set_" = storage ]; then
  mkdir -p "$tmp"; trap 'rm -rf "$tmp"' EXIT
  echo "building local-path-provisioner (cold build takes minutes)..." >&2
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$tmp/local-path-provisioner" github.com/rancher/local-path-provisioner) >&2
  rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
  echo "$out"; exit 0
fi
kver=$(awk '$1=="k8s.io/kubernetes" && $2 ~ /^v/ {print $2; exit}' "$mod/go.mod")
[ -n "$kver" ] || { echo "error: cannot read the k8s.io/kubernetes version from $mod/go.mod" >&2; exit 1; }
major=${kver#v}; minor=${major#*.}; major=${major%%.*}; minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$kver -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$kver -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
cd "$mod"
echo "building ${tools[*]} $kver (cold build takes minutes)..." >&2
for t in "${tools[@]}"; do
  if [ "$t" = etcd ]; then
    go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3 >&2
  else
    go build -trimpath -ldflags "$ldflags" -o "$tmp/$t" "k8s.io/kubernetes/cmd/$t" >&2
  fi
done
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "$out"
