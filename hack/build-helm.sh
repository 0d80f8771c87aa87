#!/usr/bin/env bash
# Builds helm from the Go module proxy (hack/tools/helm pins it) and caches it under a key made of
# that module's go.mod + go.sum, like build-tools.sh does for the Kubernetes binaries. Prints the
# directory that holds the binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mod="$here/tools/helm"
cache="${KUBENOVA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubenova}"
key=$(cat "$mod/go.mod" "$mod/go.sum" | sha256sum | cut -c1-16)
out="$cache/bin/helm-$key"
if [ -x "$out/helm" ]; then
  echo "$out"; exit 0
fi
[ -x /usr/local/go/bin/go ] && PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "error: 'go' is not on PATH; install Go >= 1.26 (see README)" >&2; exit 1; }
version=$(awk '$1=="helm.sh/helm/v3" {print $2; exit}' "$mod/go.mod")
tmp="$out.tmp.$$"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
cd "$mod"
echo "building helm $version (a cold build takes a few minutes)..." >&2
go build -trimpath -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$version" -o "$tmp/helm" \
  helm.sh/helm/v3/cmd/helm >&2
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "$out"
