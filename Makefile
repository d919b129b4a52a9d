# explaind: `make test` and `make demo` work on a fresh clone (they create .venv if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GOCODE := /usr/share/gocode/src

.PHONY: test demo proto bench world serve clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	@# The HTML report test renders in headless Chromium; deploy/'s alerts and dashboard are
	@# checked against a real Prometheus, and the Helm chart is rendered with Go's templates
	@# and Sprig (tests/helmtemplate); CI runs as root on a fresh machine.
	@missing="$$(test -x /usr/bin/chromium || echo chromium) $$(command -v prometheus >/dev/null || echo prometheus) \
		$$(test -d $(GOCODE)/github.com/Masterminds/sprig -a -d $(GOCODE)/gopkg.in/yaml.v2 || \
			echo golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev)"; \
	[ -z "$$(echo $$missing)" ] || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) || \
		echo "could not install $$missing; the tests that need it will skip"
	@# One intra-op thread per process: the suite runs servers beside the test process on
	@# 2 cores, and oversubscribed torch thread pools are several times slower.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m explaind.client.cli demo

serve: $(STAMP)
	$(PY) -m explaind.client.cli serve

proto: $(STAMP)
	$(PY) proto/generate.py

bench: $(STAMP)
	$(PY) bench/predict.py

world: $(STAMP)
	$(PY) -m explaind.world.build

clean:
	rm -rf var/ .pytest_cache
