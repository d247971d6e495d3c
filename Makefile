# photoferry: `make up` runs the stack locally, `make test` runs the test suite.
# Both install what is missing first (a virtualenv in .venv, pinned by constraints.txt).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: up test chaos monitoring lint bench bench-gateway bench-shipper bench-shipper-rules bench-keeper bench-site bench-uplink soak definitions lock clean

$(INSTALLED): pyproject.toml constraints.txt
	./devtools/system-deps.sh python
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(INSTALLED)

## up: run broker, local store, stand-in remote S3 and the services until Ctrl-C
UP_ARGS ?=
up: $(INSTALLED)
	exec $(BIN)/python -m devtools.stack $(UP_ARGS)  # exec: make itself is the parent the stack watches for SIGINT

## test: the whole suite, against real servers it starts itself (a few minutes)
test: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	./devtools/system-deps.sh chromium
	./devtools/system-deps.sh promtool
	./devtools/system-deps.sh iproute2
	$(BIN)/python -m pytest

## chaos: rounds of random faults under load, each followed by a ledger (about 5 minutes a round)
CHAOS_ARGS ?= --rounds 3
chaos: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	$(BIN)/python -m devtools.chaos $(CHAOS_ARGS)

## lint: ruff over the code
lint: $(INSTALLED)
	$(BIN)/ruff check services devtools tests bench

## bench-gateway: gateway CPU per accepted upload against a bare aiohttp floor
bench-gateway: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	$(BIN)/python -m bench.gateway_cpu

## bench-shipper: egress cap accuracy and utilisation on the wire, against rclone --bwlimit
bench-shipper: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	./devtools/system-deps.sh rclone
	$(BIN)/python -m bench.shipper_cap

## bench-shipper-rules: the shipper under a broker alarm, after a pause, and its lag under the cap, beside a baseline revision
SHIPPER_RULES_ARGS ?= --baseline d7f1d65
bench-shipper-rules: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	$(BIN)/python -m bench.shipper_rules $(SHIPPER_RULES_ARGS)

## bench-keeper: what one store sweep costs at a million photos (CPU, memory, requests)
bench-keeper: $(INSTALLED)
	$(BIN)/python -m bench.keeper_sweep

## bench-site: the site's load, lag under the cap, a burst, the gateway's headroom, fresh photos first (40 min)
BENCH_SITE_ARGS ?= --minutes 10
bench-site: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	$(BIN)/python -m bench.site $(BENCH_SITE_ARGS)

## bench-uplink: the band above the cap against fixed caps on an emulated uplink, as root (about 6 min)
BENCH_UPLINK_ARGS ?= --phase 30
bench-uplink: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	./devtools/system-deps.sh iproute2
	$(BIN)/python -m bench.uplink $(BENCH_UPLINK_ARGS)

## soak: the site's load for an hour on a site in a box whose store fills and empties (SOAK_ARGS="--minutes 10")
SOAK_ARGS ?= --minutes 60
soak: $(INSTALLED)
	./devtools/system-deps.sh rabbitmq
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

bench: bench-gateway bench-shipper bench-shipper-rules bench-keeper bench-site bench-uplink

## definitions: regenerate rabbitmq/definitions.json from services/common/topology.py
definitions: $(INSTALLED)
	$(BIN)/python -m services.common.topology > rabbitmq/definitions.json

## monitoring: write the PrometheusRule from the alert rules (deploy/k3s/components/monitoring/alerts.yaml)
monitoring: $(INSTALLED)
	$(BIN)/python -m devtools.monitoring

## lock: re-pin constraints.txt from pyproject.toml (needs uv)
lock:
	uv pip compile pyproject.toml --extra dev --python-version 3.11 --no-header \
		--annotation-style line -o constraints.txt

clean:
	rm -rf $(VENV) .stack .pytest_cache
