# Developer and CI entry points; each target delegates to scripts/.
# `make test ARGS="-k echo"` passes ARGS to pytest.

.PHONY: setup test browser-test swarm-test faults lint images up bench

ARGS ?=

setup:
	scripts/setup

test:
	scripts/test $(ARGS)

# Only the dashboard's browser tests (chromium via Playwright, real daemon, real Docker);
# `make test` runs them too.
browser-test:
	SKIP_LINT=1 scripts/test -m browser $(ARGS)

# Tests excluded from `make test` (pyproject addopts): they start their own
# daemons as root. swarm-test: a three-node Docker Swarm (scripts/swarm-fixture);
# faults: a private dockerd the tests stop and restart (scripts/private-dockerd).
swarm-test:
	SKIP_LINT=1 scripts/test -m swarm tests/swarm tests/contract/test_backend_contract.py $(ARGS)

faults:
	SKIP_LINT=1 scripts/test -m faults tests/faults $(ARGS)

lint:
	scripts/lint

images:
	scripts/build-images $(ARGS)

up:
	scripts/up $(ARGS)

# Every bench/bench_*.py in turn, after set-up; each prints its own ratios.
bench: setup
	@set -e; found=0; for script in bench/bench_*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "bench: $$script"; .venv/bin/python "$$script"; \
	done; [ "$$found" = 1 ] || { echo "bench: no bench/bench_*.py yet" >&2; exit 1; }
