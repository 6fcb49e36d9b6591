# The README's two commands: `make demo` (sets up, runs the demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-base setup-image setup-cluster demo demo-cluster test test-unit test-integration lint \
	bench bench-quick bench-footprint soak soak-quick clean wheel wheel-smoke image-lint manifest-check unit-check ship-check \
	image controlplane test-controlplane

# Setting up a fresh Debian machine, in parts, each idempotent and quick once its work is done. A target
# depends on the parts it needs, so `make demo` sets up only the base (CoreDNS's Go build is most of it).
#   setup-base     Debian packages, CoreDNS at the pinned release, the virtual environment (scripts/setup.sh):
#                  all that the demo, the unit tests, lint and the benchmarks need
#   setup-image    podman, the base images' stand-ins and the container image (scripts/setup-image.sh)
#   controlplane   kube-apiserver, kubectl, etcd, helm and the node components (scripts/setup-controlplane.sh)
#   setup-cluster  the cluster fixture's node parts: containerd, runc, CNI plugins, pause image
#   setup          all of it: `make test`, `make demo-cluster` and CI need all of it
setup: setup-base setup-image controlplane setup-cluster

setup-base:
	bash scripts/setup.sh

setup-image: setup-base
	bash scripts/setup-image.sh

setup-cluster: setup-image controlplane
	bash scripts/setup-cluster.sh

demo: setup-base
	$(PY) -m demo.sandbox

# The same story on a real single-node cluster (harness/cluster.py; about a minute, root): the shipped manifest
# applied with kubectl, a pod resolving through the node's cache, a force delete under load, kubectl delete -f.
# DEMO_ARGS="--mode nftables" for kube-proxy's nftables mode.
DEMO_ARGS ?=
demo-cluster: setup
	$(PY) -m demo.cluster $(DEMO_ARGS)

test: setup
	$(PY) -m pytest tests bench/tests

test-unit: setup-base
	$(PY) -m pytest tests/unit bench/tests

test-integration: setup
	$(PY) -m pytest tests/integration

lint: setup-base
	$(VENV)/bin/ruff check agent harness tests bench demo scripts
	$(VENV)/bin/ruff format --check agent harness tests bench demo scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Benchmarks in node sandboxes (root): `make bench` (about 17 minutes) writes bench/results/ (JSON, the
# section, the SIGKILL plot) and the section between the bench markers of docs/benchmarks.md; `make
# bench-quick` (about 75 s) runs every measurement once into build/bench-quick/ to keep the harness working.
bench: setup-base
	$(PY) -m bench.run --out bench/results --doc docs/benchmarks.md --command "make bench"
	$(PY) -m bench.footprint --out bench/results --doc docs/benchmarks.md --command "make bench"

bench-quick: setup-base
	$(PY) -m bench.run --quick --out build/bench-quick --command "make bench-quick"
	$(PY) -m bench.footprint --quick --out build/bench-quick --command "make bench-quick"

# The pod's footprint alone (about 7 minutes): the section between the footprint markers of docs/benchmarks.md.
bench-footprint: setup-base
	$(PY) -m bench.footprint --out bench/results --doc docs/benchmarks.md --command "make bench-footprint"

# Chaos soak in a node sandbox (root): the real agent under 1000 qps from a pod while seeded random faults hit
# it. `make soak` (20 minutes) writes bench/results/soak.json and the section between the soak markers of
# docs/benchmarks.md; `make soak-quick` (2 minutes, CI) writes build/soak-quick/. Both exit 1 on an
# unrecovered fault, a duplicate rule, a leak or anything the agent left behind. SOAK_ARGS passes more flags,
# e.g. SOAK_ARGS="--seed 42".
SOAK_ARGS ?=
soak: setup-base
	$(PY) -m bench.soak --out bench/results --doc docs/benchmarks.md --logs build/soak-logs --command "make soak" \
		$(SOAK_ARGS)

soak-quick: setup-base
	$(PY) -m bench.soak --quick --out build/soak-quick --logs build/soak-quick/logs --command "make soak-quick" $(SOAK_ARGS)

# Shipping: the wheel the image installs, the Dockerfile, the DaemonSet manifest and the systemd unit.
# `make ship-check` runs the checks around the image that need no container engine (the image itself is built
# by `make setup-image`, part of `make setup`, or `make image`; the integration tests run it).
wheel: setup-base
	rm -rf dist
	$(PY) -m pip wheel -q --no-deps --wheel-dir dist .

wheel-smoke: wheel
	PY=$(PY) bash scripts/wheel-smoke.sh

image-lint: setup-base
	$(VENV)/bin/hadolint image/Dockerfile

manifest-check: setup-base
	$(PY) scripts/check_manifest.py --mode iptables image/nodelocaldns.yaml image/nodelocaldns-api.yaml
	$(PY) scripts/check_manifest.py --mode ipvs image/nodelocaldns.yaml

unit-check: setup-base
	$(PY) -m pytest -q tests/unit/test_systemd_unit.py tests/unit/test_sdnotify.py

ship-check: image-lint manifest-check wheel-smoke

# The image: with a Docker engine (BuildKit) where one answers, else with podman as `make setup-image`
# configures it (ENGINE=docker|podman to choose). IMAGE names the result.
IMAGE ?= node-local-dns-agent:$(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/__init__.py)
image:
	IMAGE=$(IMAGE) ENGINE=$(ENGINE) bash scripts/build-image.sh

# The control plane the tests run (kube-apiserver, kubectl, etcd, helm; built by setup, cached), and the tests
# that use it: the API source, the manifests applied for real, the Helm chart.
controlplane:
	bash scripts/setup-controlplane.sh

test-controlplane: setup-base controlplane
	$(PY) -m pytest tests/integration/test_controlplane.py tests/integration/test_api_source.py \
		tests/integration/test_manifests_apiserver.py \
		tests/integration/test_chart.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
