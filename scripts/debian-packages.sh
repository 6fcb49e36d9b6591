#!/usr/bin/env bash
# Install the named Debian packages that are missing (apt-get update first, only when one is): used by setup.
#   scripts/debian-packages.sh LOG-TAG PACKAGE...
set -euo pipefail
tag="$1"
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf '[%s] installing Debian packages: %s\n' "$tag" "${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  printf '[%s] Debian packages present\n' "$tag"
fi
