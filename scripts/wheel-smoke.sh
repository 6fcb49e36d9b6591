#!/usr/bin/env bash
# Smoke test of the wheel the image installs, installed the way image/Dockerfile does it: every dependency
# built as a wheel first, then an offline install into a throwaway virtual environment. `agent --version`
# must then print the pinned CoreDNS release and this agent's version, and the wheel must hold every file
# of the agent package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

fail() { printf 'wheel-smoke: %s\n' "$*" >&2; exit 1; }

shopt -s nullglob
wheels=(dist/node_local_dns_agent-*.whl)
[ "${#wheels[@]}" -eq 1 ] || fail "expected one wheel in dist/, found ${#wheels[@]} (run make wheel)"
wheel="$(realpath "${wheels[0]}")"

work="$(mktemp -d -t nld-wheel-smoke.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# Every file of the agent package that git knows is in the wheel (templates and new modules included).
"$PY" - "$wheel" <<'PYEOF' || fail "the wheel misses files of the agent package"
import subprocess, sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
tracked = subprocess.run(["git", "ls-files", "agent"], capture_output=True, text=True, check=True).stdout.split()
missing = [f for f in tracked if f not in names]
stray = sorted({t for t in (n.split("/")[0] for n in names) if t != "agent" and not t.endswith(".dist-info")})
for f in missing:
    print(f"wheel-smoke: not in the wheel: {f}", file=sys.stderr)
for f in stray:
    print(f"wheel-smoke: unexpected top-level entry in the wheel: {f}", file=sys.stderr)
sys.exit(1 if missing or stray or not tracked else 0)
PYEOF

"$PY" -m pip wheel -q --wheel-dir "$work/wheels" "$wheel"
"$PY" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --no-index --find-links "$work/wheels" "$wheel"

# Run outside the source tree so the installed package, not ./agent, is what answers.
installed="$(cd "$work" && venv/bin/python -c 'import agent; print(agent.__file__)')"
case "$installed" in "$work/venv/"*) ;; *) fail "agent imported from $installed, not from the wheel" ;; esac
out="$(cd "$work" && venv/bin/agent --version)"
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' agent/__init__.py)"
# CoreDNS's own -version output first (node-cache's -version is CoreDNS's), the agent's line last.
want_first="CoreDNS-$(sed 's/^v//' image/coredns.version)"
want_last="node-local-dns-agent ${version}"
[ "$(head -1 <<<"$out")" = "$want_first" ] && [ "$(tail -1 <<<"$out")" = "$want_last" ] || fail "agent --version printed:
$out
expected $want_first first and $want_last last"
printf 'wheel-smoke: ok, %s installed with its dependencies; agent --version: %s\n' "$(basename "$wheel")" "${out//$'\n'/, }"
