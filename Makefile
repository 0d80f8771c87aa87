# The two commands of the README, and what they build on.
VENV := .venv
# The test ground runs from the checkout (testground/ is not part of the installed kubenova).
TESTGROUND := $(VENV)/bin/python -m testground

.PHONY: deps up demo test test-long test-cluster lint bench down image kind-up
deps:  ## Debian packages, the Python venv (the Go tools are built on first use)
	bash hack/install-deps.sh

up: deps  ## start the test ground and kubenova (idempotent), print how to use kubectl
	$(TESTGROUND) up

demo: deps  ## start the test ground and kubenova, boot the sample VM, show it Running
	$(TESTGROUND) demo
	@echo; echo "To use kubectl:"; $(TESTGROUND) env

test: deps  ## the whole test suite against the real apiserver, etcd and libvirtd
	$(VENV)/bin/python -m pytest

test-long: deps  ## the fault matrix, connection loss and soak (about 20 minutes; CI runs it as a step of its own)
	$(VENV)/bin/python -m pytest -m long tests/faults

test-cluster:  ## cluster mode end to end: helm install of kubenova's image on a real node (kubelet, containerd)
	bash hack/install-deps.sh --cluster
	$(TESTGROUND) down
	$(VENV)/bin/python -m pytest -m cluster tests/cluster

lint: deps  ## ruff (lint and format), the import contracts, mypy strict over the driver and the handlers
	$(VENV)/bin/ruff check operator testground tests bench hack
	$(VENV)/bin/ruff format --check operator testground tests bench hack
	$(VENV)/bin/lint-imports
	MYPYPATH=hack/mypy-path $(VENV)/bin/mypy --strict -p kubenova.driver -p kubenova.handlers

bench: deps  ## every benchmark, next to its baseline; writes docs/benchmarks.md (about 50 minutes on 2 CPUs, 20 of them the burst)
	$(VENV)/bin/python -m bench

image:  ## the container image, built without Docker (buildah), its entry point run once
	bash hack/build-image.sh

kind-up:  ## needs Docker and kind (not available on the CI machine): a kind cluster running the chart
	kind create cluster --config deploy/kind/cluster.yaml
	docker build -t localhost/kubenova:0.1.0 .
	kind load docker-image localhost/kubenova:0.1.0 --name kubenova
	helm install kubenova charts/kubenova --namespace kubenova-system --create-namespace -f deploy/kind/values.yaml

down: deps  ## stop everything the test ground started (on a fresh clone it first makes the venv it runs from)
	$(TESTGROUND) down
