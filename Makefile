# Everything a fresh machine needs (Python 3.11, Java 17, Maven, Go) is installed by these targets.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_TOOLS := kcat prometheus
ASYNCAPI := tools/asyncapi
# Go tools that check deploy/k8s: kustomize renders it, kubeconform validates what it renders.
GO       ?= $(shell command -v go || echo /usr/local/go/bin/go)
GOBIN_DIR := tools/bin
KUSTOMIZE_VERSION   := v5.8.1
KUBECONFORM_VERSION := v0.8.0
GO_TOOLS := $(GOBIN_DIR)/.kustomize-$(KUSTOMIZE_VERSION) $(GOBIN_DIR)/.kubeconform-$(KUBECONFORM_VERSION)

.PHONY: demo test lint unit tools up down clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,dev]'
	touch $@

# The AsyncAPI parser that checks schemas/asyncapi.yaml (pinned by its package-lock.json).
$(ASYNCAPI)/node_modules/.package-lock.json: $(ASYNCAPI)/package.json $(ASYNCAPI)/package-lock.json
	cd $(ASYNCAPI) && npm ci --silent --ignore-scripts --no-audit --no-fund
	touch $@

# Installed once per version into tools/bin (go install builds them from the Go module proxy).
$(GOBIN_DIR)/.kustomize-$(KUSTOMIZE_VERSION):
	GOBIN=$(CURDIR)/$(GOBIN_DIR) $(GO) install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	touch $@

$(GOBIN_DIR)/.kubeconform-$(KUBECONFORM_VERSION):
	GOBIN=$(CURDIR)/$(GOBIN_DIR) $(GO) install github.com/yannh/kubeconform/cmd/kubeconform@$(KUBECONFORM_VERSION)
	touch $@

# Debian packages some tests drive for real (kcat reads the broker like a third-party client),
# the AsyncAPI parser, and the Go tools that check the Kubernetes manifests.
tools: $(ASYNCAPI)/node_modules/.package-lock.json $(GO_TOOLS)
	@missing=""; for t in $(DEBIAN_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

## The main job: local Kafka + PostgreSQL + all workers, the bundled samples uploaded, a summary.
demo: $(BIN)/.installed
	$(BIN)/ragstream demo

## The whole test suite (lint, types, unit and integration against a real broker and database).
test: $(BIN)/.installed tools lint
	$(BIN)/pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check ragstream consumers producers tests benchmarks
	$(BIN)/mypy

unit: $(BIN)/.installed $(ASYNCAPI)/node_modules/.package-lock.json $(GO_TOOLS)
	$(BIN)/pytest tests/unit

up: $(BIN)/.installed
	$(BIN)/ragstream stack up

down: $(BIN)/.installed
	$(BIN)/ragstream stack down

clean:
	-$(BIN)/ragstream stack down
	d="$$($(BIN)/python -c 'from ragstream.settings import load_settings; print(load_settings().devstack.data_dir)')" && \
	  [ -n "$$d" ] && echo "removing $$d" && rm -rf "$$d"
