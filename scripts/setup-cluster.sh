#!/usr/bin/env bash
# The cluster fixture's node parts (harness/cluster.py): Debian's containerd, runc and CNI plugins, and a pause
# image made of Debian's static catatonit (`FROM scratch`, /pause), stored in the project's podman storage.
# The Kubernetes node components (kubelet, kube-proxy, kube-controller-manager, kube-scheduler) are built with
# the control plane by scripts/setup-controlplane.sh. node-cache's image for the migration tests is built here
# too (below). Idempotent; a second when everything is there.
#
# Nothing is started or configured on the machine: containerd's Debian service is never started (the fixture
# runs its own containerd with a private configuration inside the node's namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman-env.sh

PAUSE_IMAGE=localhost/node-local-dns-agent/pause:catatonit
LABEL=org.node-local-dns-agent.pause

log() { printf '[setup-cluster] %s\n' "$*"; }

if [ "${1:-}" = "--pause-image" ]; then
  echo "$PAUSE_IMAGE"
  exit 0
fi

# containerd 1.6 (CRI v1), runc, the CNI plugins (/usr/lib/cni: bridge, host-local, loopback, portmap) and the
# static init the pause image is made of.
bash scripts/debian-packages.sh setup-cluster containerd runc containernetworking-plugins catatonit jq

# The pause image: catatonit as /pause, `-P` (pause mode: it only reaps and waits for a signal), as the
# sandbox container of every pod. Rebuilt when the binary changes (its hash is the image's label).
key="$(sha256sum /usr/bin/catatonit | cut -c1-16)"
if [ "$(scripts/podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$PAUSE_IMAGE" 2>/dev/null)" = "$key" ]; then
  log "pause image $PAUSE_IMAGE present"
else
  work="$(mktemp -d)"
  nld_podman_leave_no_trace 'rm -rf "$work"'
  install -m 0755 /usr/bin/catatonit "$work/pause"
  tar -C "$work" --owner=0 --group=0 -cf "$work/rootfs.tar" pause
  scripts/podman import --quiet --change 'ENTRYPOINT ["/pause", "-P"]' --change "LABEL $LABEL=$key" \
    "$work/rootfs.tar" "$PAUSE_IMAGE" >/dev/null
  log "pause image $PAUSE_IMAGE built from Debian's catatonit"
fi
# node-cache's image for the migration tests (tests/integration/test_migration.py), as kubernetes/dns builds it
# (image/node-cache/Dockerfile) from the real node-cache 1.26.7 beside the repository (../shared/bin/node-cache,
# or NODE_CACHE_BINARY; harness/nodecache.py resolves it). Skipped without the binary (those tests then skip).
# Its base is a stand-in for registry.k8s.io/build-image/distroless-iptables: Debian bookworm with iptables and
# a wrapper that picks iptables-legacy or iptables-nft as kubernetes-sigs/iptables-wrappers does. The image is
# labelled with the binary's sha256, the Dockerfile's and the base's id: when those match, nothing is built.
NODE_CACHE_IMAGE=registry.k8s.io/dns/k8s-dns-node-cache:1.26.7
IPT_IMAGE=registry.k8s.io/build-image/distroless-iptables:v0.7.10
STANDIN_CACHE="${STANDIN_CACHE:-/var/cache/node-local-dns-agent/standins}"
STANDIN_LABEL=org.node-local-dns-agent.standin
NODE_CACHE_LABEL=org.node-local-dns-agent.node-cache
# Bump when the stand-in recipe below changes: the cached root filesystem is then rebuilt.
IPT_RECIPE=1
label_of() { scripts/podman image inspect --format "{{ index .Labels \"$2\" }}" "$1" 2>/dev/null || true; }

node_cache_binary="$(.venv/bin/python -c 'from harness.nodecache import NODE_CACHE_BINARY; print(NODE_CACHE_BINARY)')"
if [ ! -x "$node_cache_binary" ]; then
  log "no node-cache binary at $node_cache_binary: its image is not built (the migration tests skip)"
else
  ipt_work="" nc_work=""
  nld_podman_leave_no_trace 'rm -rf ${work:+"$work"} ${ipt_work:+"$ipt_work"} ${nc_work:+"$nc_work"}'
  ipt_key="$(echo "recipe $IPT_RECIPE" | sha256sum | cut -c1-16)"
  if [ "$(label_of "$IPT_IMAGE" "$STANDIN_LABEL")" = "$ipt_key" ]; then
    log "stand-in $IPT_IMAGE present"
  else
    rootfs="$STANDIN_CACHE/distroless-iptables-$ipt_key.tar"
    if [ ! -f "$rootfs" ]; then
      log "building the $IPT_IMAGE stand-in with mmdebstrap (about a minute)"
      mkdir -p "$STANDIN_CACHE"
      ipt_work="$(mktemp -d)"
      # What iptables-wrappers decides once, on the first call: the backend whose tables hold the kubelet's or
      # kube-proxy's marker chains (nft first, then legacy), else nft; then every name points at it.
      cat >"$ipt_work/iptables-wrapper" <<'WRAPPER'
#!/bin/sh
# Stand-in for kubernetes-sigs/iptables-wrappers (scripts/setup-cluster.sh): picks the node's backend once.
markers='^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) '
mode=nft
if ! { iptables-nft-save -t mangle; ip6tables-nft-save -t mangle; } 2>/dev/null | grep -qE "$markers"; then
  if { iptables-legacy-save; ip6tables-legacy-save; } 2>/dev/null | grep -qE "$markers"; then mode=legacy; fi
fi
for family in iptables ip6tables; do
  for suffix in "" -save -restore; do ln -sf "/usr/sbin/$family-$mode$suffix" "/usr/sbin/$family$suffix"; done
done
exec "$0" "$@"
WRAPPER
      chmod 0755 "$ipt_work/iptables-wrapper"
      trim=('/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*')
      opts=()
      for path in "${trim[@]}"; do opts+=(--dpkgopt="path-exclude=$path"); done
      mmdebstrap --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --include=iptables \
        "${opts[@]}" --aptopt='Acquire::Languages "none"' \
        --customize-hook="copy-in $ipt_work/iptables-wrapper /usr/sbin/" \
        --customize-hook='for f in iptables ip6tables; do for s in "" -save -restore; do ln -sf iptables-wrapper "$1/usr/sbin/$f$s"; done; done' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/cache/ldconfig/aux-cache' \
        --format=tar bookworm "$rootfs.tmp" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
      rm -rf "$ipt_work"
      mv -f "$rootfs.tmp" "$rootfs"
      find "$STANDIN_CACHE" -name 'distroless-iptables-*.tar' ! -path "$rootfs" -delete
    fi
    scripts/podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change "LABEL $STANDIN_LABEL=$ipt_key" "$rootfs" "$IPT_IMAGE" >/dev/null
    log "stand-in $IPT_IMAGE imported"
  fi
  nc_key="$( { sha256sum "$node_cache_binary" | cut -d' ' -f1; sha256sum image/node-cache/Dockerfile | cut -d' ' -f1
              scripts/podman image inspect --format '{{.Id}}' "$IPT_IMAGE"; } | sha256sum | cut -c1-16)"
  if [ "$(label_of "$NODE_CACHE_IMAGE" "$NODE_CACHE_LABEL")" = "$nc_key" ]; then
    log "$NODE_CACHE_IMAGE is up to date (binary $(sha256sum "$node_cache_binary" | cut -c1-16))"
  else
    nc_work="$(mktemp -d)"
    cp "$node_cache_binary" "$nc_work/node-cache"
    cp image/node-cache/Dockerfile "$nc_work/Dockerfile"
    old="$(scripts/podman image inspect --format '{{.Id}}' "$NODE_CACHE_IMAGE" 2>/dev/null || true)"
    scripts/podman build --network host --pull=never --label "$NODE_CACHE_LABEL=$nc_key" -t "$NODE_CACHE_IMAGE" \
      "$nc_work" >/dev/null
    rm -rf "$nc_work"
    new="$(scripts/podman image inspect --format '{{.Id}}' "$NODE_CACHE_IMAGE")"
    if [ -n "$old" ] && [ "$old" != "$new" ]; then scripts/podman rmi "$old" >/dev/null 2>&1 || true; fi
    log "$NODE_CACHE_IMAGE built from $node_cache_binary ($(scripts/podman image inspect --format '{{.Size}}' "$NODE_CACHE_IMAGE") bytes)"
  fi
fi
log "node parts: $(containerd --version | cut -d' ' -f3), runc $(runc --version | sed -n 's/^runc version //p'), CNI plugins in /usr/lib/cni"
