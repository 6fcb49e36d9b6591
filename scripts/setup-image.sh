#!/usr/bin/env bash
# The container image's part of `make setup`: podman (Debian's) with a private configuration, stand-ins for
# the Dockerfile's base images where no registry can be reached, and the image itself (scripts/build-image.sh).
# Idempotent; a few seconds when everything is there.
#
# Podman is configured only through files of its own under $NLD_PODMAN_DIR, selected by CONTAINERS_CONF,
# CONTAINERS_STORAGE_CONF and CONTAINERS_REGISTRIES_CONF (scripts/podman-env.sh); its storage, run state,
# locks, events and network configuration live under that directory and $NLD_PODMAN_RUN.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman-env.sh

COREDNS_VERSION="$(cat image/coredns.version)"
COREDNS_CACHE="${COREDNS_CACHE:-/var/cache/node-local-dns-agent/coredns-${COREDNS_VERSION}}"
STANDIN_CACHE="${STANDIN_CACHE:-/var/cache/node-local-dns-agent/standins}"
# The host's extra CA certificates (a TLS-intercepting proxy's, for instance) go into the Python stand-in, so
# pip inside a build trusts what the host trusts.
HOST_CAS=/usr/local/share/ca-certificates
# The names image/Dockerfile pulls; podman qualifies short names with docker.io (registries.conf below).
PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm
COREDNS_IMAGE="docker.io/coredns/coredns:${COREDNS_VERSION#v}"
# Bump when the stand-in recipe below changes: the cached root filesystem is then rebuilt.
RECIPE=1
LABEL=org.node-local-dns-agent.standin

log() { printf '[setup-image] %s\n' "$*"; }

# 1. Debian's podman with runc (crun refuses a host with both cgroup v1 and v2 hierarchies mounted) and
#    mmdebstrap for the Python stand-in, binutils (strip) for the CoreDNS one.
packages=(podman runc mmdebstrap binutils)
bash scripts/debian-packages.sh setup-image "${packages[@]}"

# 2. The private configuration, rewritten each time (atomically) so it always matches this script.
write() {  # write FILE: stdin to FILE via a temporary file and a rename
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  cat >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$1"
}
mkdir -p "$NLD_PODMAN_DIR/cni" "$NLD_PODMAN_RUN"
write "$CONTAINERS_CONF" <<EOF
# The node-local-dns agent project's podman configuration (scripts/setup-image.sh writes it).
[containers]
# No higher than what root may set here (it lacks CAP_SYS_RESOURCE, so podman's defaults fail).
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
# Containers share the host's network namespace unless told otherwise (--network ns:...): no bridge, no NAT.
netns = "host"
# conmon stays in the caller's cgroups; only the container gets a cgroup of its own.
cgroups = "no-conmon"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$NLD_PODMAN_DIR/events.log"
tmp_dir = "$NLD_PODMAN_RUN/libpod"
lock_type = "file"

[network]
network_backend = "cni"
network_config_dir = "$NLD_PODMAN_DIR/cni"
EOF
write "$CONTAINERS_STORAGE_CONF" <<EOF
# The node-local-dns agent project's container storage (scripts/setup-image.sh writes it).
[storage]
driver = "overlay"
graphroot = "$NLD_PODMAN_DIR/storage"
runroot = "$NLD_PODMAN_RUN/storage"
EOF
write "$CONTAINERS_REGISTRIES_CONF" <<EOF
# The node-local-dns agent project's registries (scripts/setup-image.sh writes it). image/Dockerfile names
# Docker Hub images by their short names; the stand-ins are stored under the qualified names.
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphDriverName}}' >/dev/null \
  || { echo "setup-image: podman does not start with $CONTAINERS_CONF" >&2; exit 1; }
log "podman $(podman version --format '{{.Client.Version}}') configured in $NLD_PODMAN_DIR"

# 3. Stand-ins for the Dockerfile's base images when no image of that name is stored. Each carries a label
#    with its recipe key, so a changed recipe (or new host CAs) replaces it; its root filesystem is cached.
mkdir -p "$STANDIN_CACHE"
work="$(mktemp -d)"
nld_podman_leave_no_trace 'rm -rf "$work"'
standin_current() {  # standin_current IMAGE KEY: the stored IMAGE was made from this recipe
  [ "$(podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$1" 2>/dev/null)" = "$2" ]
}

# python:3.11-slim-bookworm: Debian bookworm minbase with merged /usr, trimmed as the official slim image is
# (no documentation, manual pages or locales, now or in later apt installs; no apt lists or caches), Debian's
# Python 3.11 and pip reachable on the official image's paths (/usr/local/bin), pip allowed to install into
# the system (no EXTERNALLY-MANAGED marker), and the host's extra CA certificates.
cas=()
if [ -d "$HOST_CAS" ]; then mapfile -t cas < <(find "$HOST_CAS" -type f -name '*.crt' | sort); fi
key="$( { echo "recipe $RECIPE"; for ca in "${cas[@]}"; do sha256sum "$ca"; done; } | sha256sum | cut -c1-16)"
if standin_current "$PYTHON_IMAGE" "$key"; then
  log "stand-in $PYTHON_IMAGE present"
else
  rootfs="$STANDIN_CACHE/python-3.11-slim-bookworm-$key.tar"
  if [ ! -f "$rootfs" ]; then
    log "building the $PYTHON_IMAGE stand-in with mmdebstrap (about a minute)"
    trim=('/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/groff/*'
          '/usr/share/lintian/*' '/usr/share/linda/*' '/usr/share/locale/*')
    opts=()
    for path in "${trim[@]}"; do opts+=(--dpkgopt="path-exclude=$path"); done
    opts+=(--dpkgopt="path-include=/usr/share/doc/*/copyright")
    cahook=()
    if [ "${#cas[@]}" -gt 0 ]; then
      cahook=(--customize-hook="copy-in ${cas[*]} /usr/local/share/ca-certificates/"
              --customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null')
    fi
    mmdebstrap --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --include=python3,python3-pip,ca-certificates "${opts[@]}" \
      --aptopt='Acquire::Languages "none"' \
      --aptopt='Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache ""' \
      "${cahook[@]}" \
      --customize-hook='for t in python3 python pip3 pip; do ln -sf /usr/bin/${t%%[0-9]}3 "$1/usr/local/bin/$t"; done' \
      --customize-hook='ln -sf /usr/bin/python3.11 "$1/usr/local/bin/python3.11"' \
      --customize-hook='rm -f "$1"/usr/lib/python3.*/EXTERNALLY-MANAGED' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/cache/ldconfig/aux-cache' \
      --format=tar bookworm "$rootfs.tmp" \
      "deb http://deb.debian.org/debian bookworm main" \
      "deb http://deb.debian.org/debian bookworm-updates main" \
      "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null
    mv -f "$rootfs.tmp" "$rootfs"
    find "$STANDIN_CACHE" -name 'python-3.11-slim-bookworm-*.tar' ! -path "$rootfs" -delete
  fi
  podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' --change "LABEL $LABEL=$key" \
    "$rootfs" "$PYTHON_IMAGE" >/dev/null
  log "stand-in $PYTHON_IMAGE imported ($(podman image inspect --format '{{.Size}}' "$PYTHON_IMAGE") bytes)"
fi

# coredns/coredns:<pinned>: FROM scratch with the pinned release (scripts/setup.sh installed it, checked) at
# /coredns, stripped of its symbol table and debug information as release binaries are. The image takes it
# with `COREDNS_PLUGINS=full` only; its default CoreDNS, the node-local build, comes through the build context
# (scripts/build-image.sh).
coredns_bin=/usr/local/bin/coredns
"$coredns_bin" -version 2>/dev/null | grep -x "CoreDNS-${COREDNS_VERSION#v}" >/dev/null \
  || { echo "setup-image: $coredns_bin is not CoreDNS ${COREDNS_VERSION} (run scripts/setup.sh)" >&2; exit 1; }
key="$(sha256sum "$coredns_bin" | cut -c1-16)"
if standin_current "$COREDNS_IMAGE" "$key"; then
  log "stand-in $COREDNS_IMAGE present"
else
  strip -o "$work/coredns" "$coredns_bin"
  tar -C "$work" --owner=0 --group=0 -cf "$work/rootfs.tar" coredns
  podman import --quiet --change 'ENTRYPOINT ["/coredns"]' \
    --change "LABEL $LABEL=$key" "$work/rootfs.tar" "$COREDNS_IMAGE" >/dev/null
  log "stand-in $COREDNS_IMAGE imported ($(stat -c %s "$work/coredns") bytes, from $(stat -c %s "$coredns_bin"))"
fi

# 4. The image itself, built with podman (nothing is built when the stored image matches its build context).
ENGINE=podman bash scripts/build-image.sh
