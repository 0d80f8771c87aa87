# The two commands of the README, and what they build on.
VENV := .venv
KUBENOVA := $(VENV)/bin/kubenova

.PHONY: deps demo test bench down
deps:  ## Debian packages, the Python venv (the Go tools are built on first use)
	bash hack/install-deps.sh

demo: deps  ## start the test ground and kubenova, boot the sample VM, show it Running
	$(KUBENOVA) dev demo
	@echo; echo "To use kubectl:"; $(KUBENOVA) dev env

test: deps  ## the whole test suite against the real apiserver, etcd and libvirtd
	$(VENV)/bin/python -m pytest

bench: deps  ## every benchmark, next to its baseline; writes docs/benchmarks.md (about 15 minutes)
	$(VENV)/bin/python -m bench

down:  ## stop everything the test ground started
	$(KUBENOVA) dev down
