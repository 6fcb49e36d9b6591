#!/usr/bin/env bash
# Build image/Dockerfile (`make image`): with a Docker engine where one answers, else with podman in the
# project's configuration (scripts/podman-env.sh; `make setup` installs it and the base images' stand-ins).
#
#   IMAGE=name:tag ENGINE=docker|podman COREDNS_PLUGINS=node|full scripts/build-image.sh
#
# COREDNS_PLUGINS chooses the image's CoreDNS (image/Dockerfile's build argument; docs/image.md): `node`, the
# default, is the node-local plugin set that scripts/setup.sh builds into /usr/local/bin/coredns-node (here
# staged into the build context as build/image/coredns-node); `full` is the official release image's binary.
# The image is labelled with a hash of its build context (the files .dockerignore lets in, the Dockerfile,
# the CoreDNS release and build, the base images): when the stored image already has that hash, nothing is
# built.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/podman-env.sh

VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)"
IMAGE="${IMAGE:-node-local-dns-agent:${VERSION}}"
COREDNS_VERSION="$(sed 's/^v//' image/coredns.version)"
COREDNS_PLUGINS="${COREDNS_PLUGINS:-node}"
COREDNS_NODE_BIN="${COREDNS_NODE_BIN:-/usr/local/bin/coredns-node}"
COREDNS_NODE_STAGED=build/image/coredns-node
LABEL=org.node-local-dns-agent.context
PLUGINS_LABEL=org.node-local-dns-agent.coredns-plugins
if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
case "$ENGINE" in docker | podman) ;; *) echo "build-image: ENGINE must be docker or podman, not $ENGINE" >&2; exit 2 ;; esac
case "$COREDNS_PLUGINS" in node | full) ;; *) echo "build-image: COREDNS_PLUGINS must be node or full, not $COREDNS_PLUGINS" >&2; exit 2 ;; esac

if [ "$ENGINE" = podman ] && [ ! -f "$CONTAINERS_CONF" ]; then
  echo "build-image: podman is not configured for this project yet (run make setup)" >&2
  exit 1
fi

log() { printf '[image] %s\n' "$*"; }
label_of() { "$ENGINE" image inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }
id_of() { "$ENGINE" image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

# CoreDNS's node-local build into the build context (rewritten only when it differs). The Dockerfile's
# coredns-node stage copies it; a `full` build leaves that stage unused, but the context holds it all the same.
"$COREDNS_NODE_BIN" -version 2>/dev/null | grep -x "CoreDNS-${COREDNS_VERSION}" >/dev/null \
  || { echo "build-image: $COREDNS_NODE_BIN is not CoreDNS ${COREDNS_VERSION} (run scripts/setup.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$COREDNS_NODE_STAGED")"
if ! cmp -s "$COREDNS_NODE_BIN" "$COREDNS_NODE_STAGED"; then
  install -m 0755 "$COREDNS_NODE_BIN" "$COREDNS_NODE_STAGED.tmp"
  mv -f "$COREDNS_NODE_STAGED.tmp" "$COREDNS_NODE_STAGED"
fi

# The build context is what .dockerignore lets in (its "!" lines), less its excluded caches.
mapfile -t context < <(sed -n 's/^!//p' .dockerignore)
hash="$(
  {
    find "${context[@]}" image/Dockerfile scripts/build-image.sh -type f ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum
    echo "coredns $COREDNS_VERSION plugins $COREDNS_PLUGINS"
    for base in "coredns/coredns:${COREDNS_VERSION}" python:3.11-slim-bookworm; do echo "$base $(id_of "$base")"; done
  } | sha256sum | cut -c1-16
)"
if [ "$ENGINE" = podman ]; then
  # One build at a time (two `make` runs may want it together); the second then finds the image current.
  mkdir -p "$NLD_PODMAN_RUN"
  exec 9>"$NLD_PODMAN_RUN/build.lock"
  flock 9
fi
old="$(id_of "$IMAGE")"
if [ -n "$old" ] && [ "$(label_of "$IMAGE")" = "$hash" ]; then
  log "$IMAGE is up to date ($ENGINE, context $hash)"
  exit 0
fi

log "building $IMAGE with $ENGINE (context $hash, CoreDNS with the $COREDNS_PLUGINS plugin set)"
if [ "$ENGINE" = podman ]; then nld_podman_leave_no_trace; fi
started=$SECONDS
if [ "$ENGINE" = podman ]; then
  # Host network: no bridge or NAT rules on the machine. Base images come only from local storage. No layer
  # cache: podman 4.3 (buildah 1.28) mounts an empty directory for `RUN --mount=type=bind,from=wheels` when
  # the wheels stage came from the cache, and may reuse the installing layer after the wheels changed. The
  # layers are kept (as Docker keeps them), but each build makes them anew.
  podman build --network host --pull=never --layers --no-cache -f image/Dockerfile \
    --build-arg "COREDNS_VERSION=${COREDNS_VERSION}" --build-arg "COREDNS_PLUGINS=${COREDNS_PLUGINS}" \
    --label "$LABEL=$hash" --label "$PLUGINS_LABEL=$COREDNS_PLUGINS" -t "$IMAGE" .
else
  DOCKER_BUILDKIT=1 docker build -f image/Dockerfile \
    --build-arg "COREDNS_VERSION=${COREDNS_VERSION}" --build-arg "COREDNS_PLUGINS=${COREDNS_PLUGINS}" \
    --label "$LABEL=$hash" --label "$PLUGINS_LABEL=$COREDNS_PLUGINS" -t "$IMAGE" .
fi
new="$(id_of "$IMAGE")"
# The image this build replaced would only take space (a container still using it keeps it).
if [ -n "$old" ] && [ "$old" != "$new" ]; then "$ENGINE" rmi "$old" >/dev/null 2>&1 || true; fi
# podman's storage is the project's own: what no image names or uses (build stages) goes too.
if [ "$ENGINE" = podman ]; then podman image prune --force >/dev/null; fi
log "built $IMAGE in $((SECONDS - started)) s: $("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE") bytes"
