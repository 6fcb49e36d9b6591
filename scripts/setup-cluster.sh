#!/usr/bin/env bash
# The cluster fixture's node parts (harness/cluster.py): Debian's containerd, runc and CNI plugins, and a pause
# image made of Debian's static catatonit (`FROM scratch`, /pause), stored in the project's podman storage.
# The Kubernetes node components (kubelet, kube-proxy, kube-controller-manager, kube-scheduler) are built with
# the control plane by scripts/setup-controlplane.sh. Idempotent; a second when everything is there.
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
log "node parts: $(containerd --version | cut -d' ' -f3), runc $(runc --version | sed -n 's/^runc version //p'), CNI plugins in /usr/lib/cni"
