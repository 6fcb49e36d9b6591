# Sourced by the project's scripts: podman reads only the project's own configuration, written by
# scripts/setup-image.sh (nothing under /etc/containers is read for these three files or changed).
NLD_PODMAN_DIR="${NLD_PODMAN_DIR:-/var/lib/node-local-dns-agent/podman}"
NLD_PODMAN_RUN="${NLD_PODMAN_RUN:-/run/node-local-dns-agent/podman}"
export CONTAINERS_CONF="$NLD_PODMAN_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$NLD_PODMAN_DIR/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$NLD_PODMAN_DIR/registries.conf"

# Podman 4.3 writes a blob-info cache to /var/lib/containers/cache on imports and builds, whatever its storage
# configuration says. A script that imports or builds calls this first (it sets the EXIT trap): a machine that
# had no /var/lib/containers has none afterwards.
nld_podman_leave_no_trace() {
  local extra="${1:-}"
  if [ -e /var/lib/containers ]; then
    trap "$extra" EXIT
  else
    trap "$extra${extra:+; }rm -rf /var/lib/containers" EXIT
  fi
}
