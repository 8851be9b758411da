#!/usr/bin/env bash
# Builds the Kueue controller (sigs.k8s.io/kueue/cmd/kueue, pinned in this folder's go.mod/go.sum: its own Go module,
# so the control plane's cache key, a hash of ../go.mod and ../go.sum, does not change) and copies its CRDs and
# webhook configurations from the module source, into a cache outside the work tree:
#   ${STAGERUN_CLUSTER_CACHE:-$HOME/.cache/stagerun-cluster}/kueue-<first 16 hex of sha256(go.mod go.sum)>/{bin,config}
# tests/test_kueue.py runs it against the test control plane and skips, naming this script, when it is missing.
# 15 minutes cold measured on a busy 2-core machine (6 CPU-minutes; it shares little with the control plane's build:
# Kueue pins other k8s.io versions); a second run takes a second. Usage: tests/cluster/kueue/build.sh [--print-root]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

key="$(cat go.mod go.sum | sha256sum | cut -c1-16)"
root="${STAGERUN_CLUSTER_CACHE:-$HOME/.cache/stagerun-cluster}/kueue-$key"
if [[ "${1:-}" == "--print-root" ]]; then
  echo "$root"
  exit 0
fi
command -v go >/dev/null || { echo "kueue/build.sh: no 'go' on PATH; install Go >= $(awk '/^go /{print $2}' go.mod)" >&2; exit 1; }
version="$(grep -Eo 'sigs\.k8s\.io/kueue v[^ ]+' go.mod | head -1 | cut -d' ' -f2)"

mkdir -p "$root/bin"
exec 9>"$root/.lock"
flock 9

# Kueue's CRDs (Workload, ClusterQueue, LocalQueue, ResourceFlavor, ...) and its webhook configurations ship in its
# module source; copied next to the binary so the cache does not depend on the Go module cache surviving.
if [[ ! -d "$root/config" ]]; then
  go mod download sigs.k8s.io/kueue
  src="$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)/config/components"
  rm -rf "$root/config.tmp" && mkdir -p "$root/config.tmp/crds"
  cp "$src"/crd/bases/*.yaml "$root/config.tmp/crds/"
  cp "$src/webhook/manifests.yaml" "$root/config.tmp/webhook-manifests.yaml"
  mv "$root/config.tmp" "$root/config"
fi

if [[ -x "$root/bin/kueue" ]]; then
  echo "kueue/build.sh: kueue $version: cached ($root/bin/kueue)"
  exit 0
fi
start=$SECONDS
echo "kueue/build.sh: kueue $version: building sigs.k8s.io/kueue/cmd/kueue ..."
# nice: the cores are shared with the tests; CGO off: a static binary, as Kueue releases it.
CGO_ENABLED=0 nice -n 19 go build -ldflags "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$version" \
  -o "$root/bin/.kueue.tmp" sigs.k8s.io/kueue/cmd/kueue
mv "$root/bin/.kueue.tmp" "$root/bin/kueue" # atomic: a killed build never leaves a binary that looks complete
echo "kueue/build.sh: kueue $version: built in $((SECONDS - start)) s; binary in $root/bin"
