# Ferry's two commands: `make run` (the service) and `make test` (the suite). See README.md.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run lint test bench kafka-start kafka-stop kafka-status cluster cluster-stop cluster-status clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Ferry needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m deploy.run_local

# Style, likely bugs and types (configured in pyproject.toml); `make test` runs it first.
lint: install
	$(PY) -m ruff check .
	$(PY) -m mypy

# Fetching the jars before pytest keeps the suite's timeouts about tests, not downloads.
test: install lint
	$(PY) -m deploy.kafka fetch
	$(PY) -m pytest $(PYTEST_ARGS)

# Every scenario at full size (tens of minutes); one scenario: `make bench BENCH_ARGS="--scenarios submit"`.
bench: install
	$(PY) -m deploy.kafka fetch
	$(PY) -m bench.run $(BENCH_ARGS)

kafka-start: install
	$(PY) -m deploy.kafka start

kafka-stop: install
	$(PY) -m deploy.kafka stop

kafka-status: install
	$(PY) -m deploy.kafka status

# Three KRaft nodes, replication 3, min.insync.replicas 2 (deploy/kafka/cluster.py), for broker-loss tests.
cluster: install
	$(PY) -m deploy.kafka cluster start

cluster-stop: install
	$(PY) -m deploy.kafka cluster stop

cluster-status: install
	$(PY) -m deploy.kafka cluster status

clean: kafka-stop cluster-stop
	rm -rf $(VENV) .local
