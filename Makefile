# Flow Nexus — the commands. `make test` is what CI runs (via .ci/run).
PYTHON ?= python
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer_image:$(CURDIR)

.PHONY: help install crds chart-crds verify lint typecheck test test-unit test-integration test-e2e test-reliability \
        cluster-up cluster-down cluster-status demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

install:  ## install the project with every extra (operator, trainer, dev) in editable mode
	$(PYTHON) -m pip install -e '.[operator,trainer,dev]'

crds:  ## regenerate crds/ and policies/ from the pydantic API types, and the chart's copies
	$(PYTHON) -m flownexus.crdgen --out crds
	$(PYTHON) -m flownexus.policies --out policies
	$(MAKE) --no-print-directory chart-crds

chart-crds:
	mkdir -p helm/flownexus/crds helm/flownexus/policies
	cp crds/*.yaml helm/flownexus/crds/
	cp policies/*.yaml helm/flownexus/policies/

verify: crds lint typecheck  ## regenerate everything generated; fail on any drift, lint or type error
	$(PYTHON) monitoring/render.py --check
	$(PYTHON) argocd/render.py --check
	@git add -N crds policies helm >/dev/null 2>&1 || true
	@if ! git diff --exit-code --stat -- crds policies helm; then \
		echo "generated files drifted from the API types: run 'make crds' and commit"; exit 1; fi
	@echo "verify: generated files match the API types"

lint:  ## ruff
	$(PYTHON) -m ruff check .

typecheck:  ## mypy --strict on the operator, the trainer and the cluster tooling
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy --strict dev/localcluster
	$(PYTHON) -m mypy --strict -p monitoring

test-unit:
	$(PYTHON) -m pytest tests/unit $(PYTEST_ARGS)

test-integration:
	$(PYTHON) -m pytest tests/integration -m integration $(PYTEST_ARGS)

test-e2e:
	$(PYTHON) -m pytest tests/e2e -m e2e $(PYTEST_ARGS)

test-reliability:  ## SIGKILL the operator mid-run, restart the API server (dev cluster; docs/RELIABILITY.md)
	$(PYTHON) -m pytest tests/reliability -m reliability -s $(PYTEST_ARGS)

test: verify  ## lint, types, generated-file drift, then every test (unit, integration, e2e)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

cluster-up:  ## start the local Kubernetes (real node + KWOK nodes), built here without Docker
	./dev/cluster up $(if $(FAKE_NODES),--fake-nodes $(FAKE_NODES)) $(if $(FAKE_GPU_NODES),--fake-gpu-nodes $(FAKE_GPU_NODES))

cluster-down:  ## stop it and remove everything it created
	./dev/cluster down

cluster-status:
	./dev/cluster status

demo:  ## train digits, gate it, serve it (local cluster)
	./dev/demo

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
