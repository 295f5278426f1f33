# Two commands for a newcomer: `make demo` and `make test`. Every target installs what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RECORD := runs/demo-sandbox-record.jsonl

.PHONY: install demo nightly test soak lint bench serve sandbox clean chromium postgresql

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# Sends the sample spreadsheet to a local sandbox (some answers are lost on the way back:
# --drop-after-accept), then reads the sandbox's delivery reports: the lost answers are
# confirmed as sent, and the delivery counts are printed.
demo: install
	@mkdir -p runs
	@scripts/with-sandbox.sh --latency-ms 20 --fail-rate 0.05 --drop-after-accept 0.05 \
		--undelivered-rate 0.1 --delivery-delay-s 1 --opt-out-rate 0.1 --record $(RECORD) -- \
		sh -c '$(BIN)/campaign run jobs/demo.yaml --no-progress; sleep 3; \
			echo; echo "delivery reports:"; $(BIN)/campaign reconcile jobs/demo.yaml; \
			echo; echo "people who replied STOP:"; $(BIN)/campaign suppress sync jobs/demo.yaml'
	@echo "summary: $$(ls -td runs/demo-*/ | head -1)summary.json"
	@echo "requests the sandbox accepted so far: $$(wc -l < $(RECORD)) (in $(RECORD))"

# Today's campaign, then the delivery reports of the previous one (scripts/nightly.sh).
nightly: install
	BIN=$(BIN) scripts/nightly.sh jobs/nightly.yaml

sandbox: install
	$(BIN)/campaign sandbox --port 8765

# The upload page against the sandbox; prints the page's URL and the access token.
# SERVE_PORT=N picks another port than 8080.
serve: install
	@mkdir -p runs
	@scripts/with-sandbox.sh --latency-ms 20 --fail-rate 0.05 --record $(RECORD) -- \
		$(BIN)/campaign serve jobs/demo.yaml --port $${SERVE_PORT:-8080}

# The browser tests drive Debian's chromium (never a downloaded browser). Installed when
# missing and we can (root with apt-get); otherwise those tests skip and say why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
			|| echo "could not install chromium: the browser tests will skip"; \
	fi

# The PostgreSQL tests start their own server (initdb and pg_ctl from Debian's postgresql,
# into a temporary directory). Installed when missing and we can (root with apt-get);
# otherwise those tests skip and say why.
postgresql:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing postgresql for the PostgreSQL tests (apt-get)"; \
			{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
				|| echo "could not install postgresql: the PostgreSQL tests will skip"; \
		else \
			echo "initdb not found and not root with apt-get: the PostgreSQL tests will skip"; \
		fi; \
	fi

# Four processes share the tests on two cores (much of their time is waiting on servers,
# leases and subprocesses); the ones that count requests against a rate at a real server
# run afterwards, by themselves.
test: install chromium postgresql
	$(BIN)/pytest -q -rs -n 4 -m "not exact_rate"
	$(BIN)/pytest -q -rs -n 2 -m exact_rate

# The hostile schedules (two processes, kill -9, several writers) many times each, not once:
# run before a release. SOAK_TRIALS=N sets how many (default 20).
soak: install chromium postgresql
	CAMPAIGN_SOAK_TRIALS=$${SOAK_TRIALS:-20} $(BIN)/pytest -q -rs -n 2 -m soak

# Speed and exactness against local sandboxes: prints a table, writes bench/results.json.
# Takes several minutes; BENCH_QUICK=1 skips the million-row measure.
bench: install
	$(BIN)/python bench/run.py $(if $(BENCH_QUICK),--quick)

lint: install
	$(BIN)/ruff check campaign tests bench scripts
	$(BIN)/ruff format --check campaign tests bench scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
