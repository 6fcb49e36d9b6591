# The README's two commands: `make demo` (sets up, runs the demo) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-unit test-integration lint bench bench-quick clean \
	wheel wheel-smoke image-lint manifest-check unit-check ship-check image controlplane test-controlplane

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m bench.demo

test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

test-integration: setup
	$(PY) -m pytest tests/integration

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench
	$(VENV)/bin/mypy

# Benchmarks in node sandboxes (root): `make bench` (about 15 minutes) writes bench/results/ (JSON, the
# README section, the SIGKILL plot) and the README section between the bench markers; `make bench-quick`
# (under a minute) runs every measurement once into build/bench-quick/ to keep the harness working.
bench: setup
	$(PY) -m bench.run --out bench/results --readme README.md --command "make bench"

bench-quick: setup
	$(PY) -m bench.run --quick --out build/bench-quick --command "make bench-quick"

# Shipping: the wheel the image installs, the Dockerfile, the DaemonSet manifest and the systemd unit.
# `make ship-check` runs every check CI needs; none needs a Docker engine (there is none on these machines).
wheel: setup
	rm -rf dist
	$(PY) -m pip wheel -q --no-deps --wheel-dir dist .

wheel-smoke: wheel
	PY=$(PY) bash scripts/wheel-smoke.sh

image-lint: setup
	$(VENV)/bin/hadolint image/Dockerfile

manifest-check: setup
	$(PY) scripts/check_manifest.py --mode iptables image/nodelocaldns.yaml image/nodelocaldns-api.yaml
	$(PY) scripts/check_manifest.py --mode ipvs image/nodelocaldns.yaml

unit-check: setup
	$(PY) -m pytest -q tests/unit/test_systemd_unit.py tests/unit/test_sdnotify.py

ship-check: image-lint manifest-check wheel-smoke

# Needs a Docker engine with BuildKit; IMAGE names the result.
IMAGE ?= node-local-dns-agent:$(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/__init__.py)
image:
	docker build -f image/Dockerfile --build-arg COREDNS_VERSION=$$(sed 's/^v//' image/coredns.version) -t $(IMAGE) .

# The control plane the tests run (kube-apiserver, kubectl, etcd, helm; built by setup, cached), and the tests
# that use it: the API source, the manifests applied for real, the Helm chart.
controlplane:
	bash scripts/setup-controlplane.sh

test-controlplane: setup
	$(PY) -m pytest tests/integration/test_controlplane.py tests/integration/test_api_source.py \
		tests/integration/test_manifests_apiserver.py \
		tests/integration/test_chart.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
