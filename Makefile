# The two commands of the README, and what they build on.
VENV := .venv
KUBENOVA := $(VENV)/bin/kubenova

.PHONY: deps demo test down
deps:  ## Debian packages, the Python venv (the Go tools are built on first use)
	bash hack/install-deps.sh

demo: deps  ## start the test ground and kubenova, boot the sample VM, show it Running
	$(KUBENOVA) dev demo
	@echo; echo "To use kubectl:"; $(KUBENOVA) dev env

test: deps  ## the whole test suite against the real apiserver, etcd and libvirtd
	$(VENV)/bin/python -m pytest

down:  ## stop everything the test ground started
	$(KUBENOVA) dev down
