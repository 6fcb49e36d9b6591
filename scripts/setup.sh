#!/usr/bin/env bash
# The base of a fresh machine's setup (`make setup-base`): host tools, CoreDNS at the pinned release (with
# every plugin, and with the node-local plugin set the image ships), the virtual environment; all that `make
# demo`, the unit tests, lint and the benchmarks need. The rest of `make setup` (podman and the image, the
# control plane, the cluster's node parts) is in scripts/setup-image.sh, scripts/setup-controlplane.sh and
# scripts/setup-cluster.sh. Idempotent and quick when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

COREDNS_VERSION="$(cat image/coredns.version)"
COREDNS_BIN=/usr/local/bin/coredns
COREDNS_CACHE="${COREDNS_CACHE:-/var/cache/node-local-dns-agent/coredns-${COREDNS_VERSION}}"
COREDNS_NODE_BIN=/usr/local/bin/coredns-node
COREDNS_NODE_CACHE="${COREDNS_NODE_CACHE:-/var/cache/node-local-dns-agent/coredns-node-${COREDNS_VERSION}}"
VENV="${VENV:-.venv}"

log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages the agent and the tests use (systemd: systemd-analyze and systemd-notify check the unit;
#    util-linux: setpriv runs commands with only the capabilities the unit and the DaemonSet grant;
#    time: GNU time measures the peak memory of `agent --check` in the benchmarks).
packages=(iptables nftables iproute2 conntrack dnsutils dnsperf procps psmisc libc-bin systemd util-linux time)
bash scripts/debian-packages.sh setup "${packages[@]}"

# 2. CoreDNS from the upstream Go module at the pinned release, cached. (grep without -q reads all of
#    `coredns -version`: with -q, CoreDNS could die of SIGPIPE and pipefail would call the check failed.)
want="CoreDNS-${COREDNS_VERSION#v}"
if [ -x "$COREDNS_BIN" ] && "$COREDNS_BIN" -version 2>/dev/null | grep -x "$want" >/dev/null; then
  log "coredns ${COREDNS_VERSION} present at ${COREDNS_BIN}"
else
  if [ ! -x "$COREDNS_CACHE/coredns" ]; then
    command -v go >/dev/null || { echo "setup: the Go toolchain is needed to build CoreDNS" >&2; exit 1; }
    log "building coredns ${COREDNS_VERSION} from its Go module (several minutes the first time)"
    mkdir -p "$COREDNS_CACHE"
    GOBIN="$COREDNS_CACHE" CGO_ENABLED=0 go install "github.com/coredns/coredns@${COREDNS_VERSION}"
  fi
  install -m 0755 "$COREDNS_CACHE/coredns" "$COREDNS_BIN"
  "$COREDNS_BIN" -version | grep -x "$want" >/dev/null || { echo "setup: $COREDNS_BIN is not $want" >&2; exit 1; }
  log "installed $($COREDNS_BIN -version | head -1) at ${COREDNS_BIN}"
fi

# 3. CoreDNS with the node-local plugin set (image/coredns-node: the image's default CoreDNS; docs/image.md),
#    same release, built reproducibly from the repository's module and cached under a key of its sources, so
#    a changed plugin list rebuilds it. Installed beside the full one, which the sandbox's kube-dns servers use.
want_node="$want"
node_key="$(cat image/coredns-node/main.go image/coredns-node/go.mod image/coredns-node/go.sum | sha256sum | cut -c1-16)"
if [ -x "$COREDNS_NODE_CACHE/coredns" ] && [ "$(cat "$COREDNS_NODE_CACHE/sources" 2>/dev/null)" = "$node_key" ] \
  && [ -x "$COREDNS_NODE_BIN" ] && cmp -s "$COREDNS_NODE_CACHE/coredns" "$COREDNS_NODE_BIN"; then
  log "coredns ${COREDNS_VERSION} (node-local plugins) present at ${COREDNS_NODE_BIN}"
else
  if [ ! -x "$COREDNS_NODE_CACHE/coredns" ] || [ "$(cat "$COREDNS_NODE_CACHE/sources" 2>/dev/null)" != "$node_key" ]; then
    command -v go >/dev/null || { echo "setup: the Go toolchain is needed to build CoreDNS" >&2; exit 1; }
    log "building coredns ${COREDNS_VERSION} with the node-local plugins (a minute or more the first time)"
    mkdir -p "$COREDNS_NODE_CACHE"
    # Reproducible: no cgo, no paths, no VCS stamp, no build id; symbols and DWARF left out as CoreDNS's own
    # release builds leave them (-s -w). The module's go.sum pins every dependency (-mod=readonly).
    (cd image/coredns-node && GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0 \
      go build -trimpath -buildvcs=false -ldflags "-s -w -buildid=" -o "$COREDNS_NODE_CACHE/coredns.tmp" .)
    mv -f "$COREDNS_NODE_CACHE/coredns.tmp" "$COREDNS_NODE_CACHE/coredns"
    echo "$node_key" >"$COREDNS_NODE_CACHE/sources"
  fi
  install -m 0755 "$COREDNS_NODE_CACHE/coredns" "$COREDNS_NODE_BIN"
  "$COREDNS_NODE_BIN" -version | grep -x "$want_node" >/dev/null \
    || { echo "setup: $COREDNS_NODE_BIN is not $want_node" >&2; exit 1; }
  log "installed $($COREDNS_NODE_BIN -version | head -1) with $($COREDNS_NODE_BIN -plugins | grep -c .) plugins at ${COREDNS_NODE_BIN}"
fi

# 4. The virtual environment with the agent installed editable.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log "installing the agent (editable) with its dev extra"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
else
  log "virtual environment up to date"
fi
log "done"
