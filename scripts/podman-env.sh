# Sourced by the project's scripts: podman reads only the project's own configuration, written by
# scripts/setup-image.sh (nothing under /etc/containers is read for these three files or changed).
NLD_PODMAN_DIR="${NLD_PODMAN_DIR:-/var/lib/node-local-dns-agent/podman}"
NLD_PODMAN_RUN="${NLD_PODMAN_RUN:-/run/node-local-dns-agent/podman}"
export CONTAINERS_CONF="$NLD_PODMAN_DIR/containers.conf"
export CONTAINERS_STORAGE_CONF="$NLD_PODMAN_DIR/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$NLD_PODMAN_DIR/registries.conf"
