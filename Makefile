# explaind: `make test` and `make demo` work on a fresh clone (they create .venv if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist; 0: one). Each takes whole files, so a module's server
# serves only its own tests.
TEST_WORKERS ?= 2
FORK_TESTS = tests/test_client_fork.py

.PHONY: test test-gpu coverage demo proto bench world serve clean

# A venv of another Python (macOS's python3 is 3.9, Homebrew's may be 3.14) is refused with
# what to do: pip's own refusal left it in place, and `make demo PYTHON=python3.13` then
# reused it and failed again. The bounds are pyproject.toml's requires-python.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(None if (3, 11) <= sys.version_info < (3, 14) else f"$(VENV) is Python {sys.version.split()[0]}; explaind needs 3.11 to 3.13: rm -rf $(VENV), then run make with PYTHON=python3.13 (or 3.11, 3.12)")'
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	@sh tests/system_packages.sh
	@# One intra-op thread per process: the suite runs servers beside the test processes on
	@# 2 cores, and oversubscribed torch thread pools are several times slower. Two test
	@# processes: much of a test's time is a server starting or a client waiting, and the
	@# other process uses that core meanwhile.
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --ignore=$(FORK_TESTS)
	@# The fork tests in a process of their own (15 s): a child forked from a worker that had
	@# run other files' in-process gRPC servers hung in one run of the suite (2026-12-06),
	@# never in 25 runs on their own (at a fork the SDK sees only its own calls, not other
	@# gRPC users').
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(FORK_TESTS)

# The tests marked gpu, which `make test` skips without CUDA; here no CUDA is an error,
# not quiet skips.
test-gpu: $(STAMP)
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else f'make test-gpu: torch {torch.__version__} sees no CUDA device')"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs -m gpu

# The suite's branch coverage, per file with the lines never run (config: pyproject.toml's
# [tool.coverage.*]). coverage is installed here, not by .[dev]: `make test` needs none of it.
# TESTS: test files or node ids to run instead of all (e.g. TESTS=tests/test_service_jobs.py).
coverage: $(STAMP)
	@sh tests/system_packages.sh
	$(PY) -m pip install -q 'coverage>=7.10'
	rm -rf var/coverage && mkdir -p var/coverage
	OMP_NUM_THREADS=1 $(PY) -m coverage run -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(TESTS)
	$(PY) -m coverage combine -q
	$(PY) -m coverage report

demo: $(STAMP)
	$(PY) -m explaind demo

serve: $(STAMP)
	$(PY) -m explaind serve

# Also records additions in proto/wire_snapshot.json; a wire break (a field renumbered,
# retyped, or removed without `reserved`) is refused: see proto/wire_compat.py.
proto: $(STAMP)
	$(PY) proto/generate.py
	$(PY) proto/wire_compat.py --update

bench: $(STAMP)
	$(PY) bench/predict.py

world: $(STAMP)
	$(PY) -m explaind.world.build

clean:
	rm -rf var/ .pytest_cache
