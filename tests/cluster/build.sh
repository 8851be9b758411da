#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok, kubectl) from
# the Go modules pinned in this folder's go.mod/go.sum, into a cache outside the work tree:
#   ${STAGERUN_CLUSTER_CACHE:-$HOME/.cache/stagerun-cluster}/<first 16 hex of sha256(go.mod go.sum)>/bin
# A binary already in that folder is not rebuilt, so a second run takes a second; changing go.mod/go.sum gives a
# new folder. ~7 minutes cold on 2 cores (the Go build cache then holds ~3 GB); tests/cluster/control_plane.py
# computes the same folder and the `cluster` tests skip, naming this script, when a binary is missing.
# Usage: tests/cluster/build.sh [--print-bin]   (--print-bin: print the bin folder and exit, building nothing)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

key="$(cat go.mod go.sum | sha256sum | cut -c1-16)"
root="${STAGERUN_CLUSTER_CACHE:-$HOME/.cache/stagerun-cluster}/$key"
bin="$root/bin"
if [[ "${1:-}" == "--print-bin" ]]; then
  echo "$bin"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: no 'go' on PATH; install Go >= $(awk '/^go /{print $2}' go.mod)" >&2; exit 1; }

# The servers report this version (kubectl refuses to parse the default v0.0.0-master), taken from go.mod so the
# cache key covers it.
kube_version="$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' go.mod)"
minor="$(echo "$kube_version" | cut -d. -f2)"
ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version -X k8s.io/component-base/version.gitMajor=1"
ldflags+=" -X k8s.io/component-base/version.gitMinor=$minor"

declare -A packages=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kwok]=sigs.k8s.io/kwok/cmd/kwok
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
)
# apiserver first: it compiles most of what the others share, so they then take seconds.
order=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)

mkdir -p "$bin"
exec 9>"$root/.lock"
flock 9 # two concurrent builds (e.g. two CI jobs on one cache) would compile everything twice

# The kwok Stage objects (fake node and pod lifecycles) ship in kwok's module source; copy the ones the harness
# uses next to the binaries so the cache does not depend on the Go module cache surviving.
stages="$root/stages"
if [[ ! -d "$stages" ]]; then
  go mod download sigs.k8s.io/kwok
  src="$(go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  mkdir -p "$stages.tmp"
  cp "$src/node/fast/node-initialize.yaml" "$src/node/heartbeat/node-heartbeat.yaml" \
    "$src/pod/fast/pod-ready.yaml" "$src/pod/general/pod-delete.yaml" "$stages.tmp/"
  mv "$stages.tmp" "$stages"
fi

total_start=$SECONDS
built=0
for name in "${order[@]}"; do
  if [[ -x "$bin/$name" ]]; then
    echo "build.sh: $name: cached ($bin/$name)"
    continue
  fi
  start=$SECONDS
  echo "build.sh: $name: building ${packages[$name]} ..."
  # nice: CI and dev machines share these cores with the tests; CGO off: static binaries, as Kubernetes releases them.
  CGO_ENABLED=0 nice -n 19 go build -ldflags "$ldflags" -o "$bin/.$name.tmp" "${packages[$name]}"
  mv "$bin/.$name.tmp" "$bin/$name" # atomic: a killed build never leaves a binary that looks complete
  echo "build.sh: $name: built in $((SECONDS - start)) s"
  built=$((built + 1))
done
echo "build.sh: $built built, $((${#order[@]} - built)) cached, $((SECONDS - total_start)) s; binaries in $bin"
