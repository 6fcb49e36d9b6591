#!/usr/bin/env bash
# The test bed's control plane: kube-apiserver and kubectl (with the node components kubelet, kube-proxy,
# kube-controller-manager and kube-scheduler for the cluster fixture), etcd and helm, each built from the Go
# module pinned under controlplane/ (go.mod and go.sum committed) and cached under /var/cache/node-local-dns-agent/, so a warm
# run takes a second. Nothing is installed on the machine's PATH: the tests run these binaries by path
# (harness/controlplane.py finds them the same way as this script).
#
#   scripts/setup-controlplane.sh           build what is missing or out of date
#   scripts/setup-controlplane.sh --paths   print NAME=PATH for every binary (nothing is built)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE_ROOT="${CONTROLPLANE_CACHE:-/var/cache/node-local-dns-agent}"
# Go build parallelism: the machines have 2 cores shared with other work; the build also runs niced.
JOBS="${CONTROLPLANE_BUILD_JOBS:-2}"

log() { printf '[setup] %s\n' "$*"; }

# The version a module requires: `required DIR MODULE`.
required() { awk -v m="$2" '$1 == m || ($1 == "require" && $2 == m) { print $NF; exit }' "$1/go.mod"; }

# A hash of everything a component's build depends on: its module files and the Go toolchain.
source_hash() { { cat "$1"/go.mod "$1"/go.sum "$1"/*.go; go version; } | sha256sum | cut -c1-16; }

# build NAME DIR OUT LDFLAGS PACKAGE...: build the packages of module DIR into OUT unless OUT holds them from
# the same sources.
build() {
  local name="$1" dir="$2" out="$3" ldflags="$4"
  shift 4
  local hash stamp="$out/.source"
  hash="$(source_hash "$dir")"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ]; then
    log "$name cached in $out"
    return
  fi
  log "building $name into $out (minutes the first time)"
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
  local started=$SECONDS
  (cd "$dir" && CGO_ENABLED=0 nice -n 10 go build -p "$JOBS" -trimpath -ldflags "-s -w $ldflags" \
    -o "$out.tmp/" "$@")
  echo "$hash" >"$out.tmp/.source"
  rm -rf "$out"
  mv "$out.tmp" "$out"
  log "built $name in $((SECONDS - started)) s"
}

k8s_dir=controlplane/kubernetes
etcd_dir=controlplane/etcd
helm_dir=controlplane/helm
k8s_version="$(required "$k8s_dir" k8s.io/kubernetes)"
etcd_version="$(required "$etcd_dir" go.etcd.io/etcd/server/v3)"
helm_version="$(required "$helm_dir" helm.sh/helm/v3)"
k8s_out="$CACHE_ROOT/kubernetes-full-$k8s_version"  # the control plane and the node components
etcd_out="$CACHE_ROOT/etcd-$etcd_version"
helm_out="$CACHE_ROOT/helm-$helm_version"

if [ "${1:-}" = "--paths" ]; then
  for cmd in kube-apiserver kubectl kubelet kube-proxy kube-controller-manager kube-scheduler; do
    printf '%s=%s\n' "$cmd" "$k8s_out/$cmd"
  done
  printf '%s=%s\n' etcd "$etcd_out/etcd" helm "$helm_out/helm"
  exit 0
fi

command -v go >/dev/null || { echo "setup-controlplane: the Go toolchain is needed" >&2; exit 1; }
command -v openssl >/dev/null || {
  log "installing openssl (the control-plane fixture makes its certificates with it)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null
}

# /version must read the release, not v0.0.0-master: the version variables of component-base (the servers)
# and client-go (kubectl's client version).
minor="${k8s_version#v*.}"
minor="${minor%%.*}"
major="${k8s_version#v}"
major="${major%%.*}"
k8s_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean"
done
k8s_cmds=(kube-apiserver kubectl kubelet kube-proxy kube-controller-manager kube-scheduler)
build "Kubernetes $k8s_version (${k8s_cmds[*]})" "$k8s_dir" "$k8s_out" "$k8s_ldflags" \
  "${k8s_cmds[@]/#/k8s.io/kubernetes/cmd/}"

build "etcd $etcd_version" "$etcd_dir" "$etcd_out" "" .

# helm's version, and the Kubernetes version it assumes offline (helm template), from the modules it uses.
client_go="$(cd "$helm_dir" && go list -m -f '{{.Version}}' k8s.io/client-go)"
client_minor="${client_go#v0.}"
client_minor="${client_minor%%.*}"
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$helm_version -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$client_minor"
done
build "helm $helm_version" "$helm_dir" "$helm_out" "$helm_ldflags" helm.sh/helm/v3/cmd/helm

# (Output captured first: a `grep -q` closing the pipe early would fail the pipeline under pipefail.)
version_is() { local out; out="$("$1" "${@:3}")"; [[ "$out" == *"$2"* ]] ||
  { echo "setup-controlplane: $1 is not $2" >&2; exit 1; }; }
for cmd in kube-apiserver kubelet kube-proxy kube-controller-manager kube-scheduler; do
  version_is "$k8s_out/$cmd" "Kubernetes $k8s_version" --version
done
version_is "$etcd_out/etcd" "etcd Version: ${etcd_version#v}" --version
version_is "$helm_out/helm" "$helm_version" version --template '{{.Version}}'
log "control plane: ${k8s_cmds[*]} $k8s_version, etcd $etcd_version, helm $helm_version"
