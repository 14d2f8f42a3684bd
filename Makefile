# Two commands do all set-up on a fresh machine:
#   make run    install into .venv (first time only) and run kiri
#   make test   install into .venv (first time only) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiri-installed

.PHONY: run test lint bench clean tools

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/kiri demo

# Debian packages the tests need: docker-compose checks docker-compose.yml statically (there is
# no Docker engine here); chromium runs the dashboard's browser test (never downloaded at run time);
# prometheus scrapes a live hub for the Grafana dashboard's queries; systemd-analyze verifies the units;
# postgresql's server binaries (initdb, pg_ctl: not on PATH in Debian) run the tests' throwaway clusters.
APT_TOOLS := docker-compose:docker-compose chromium:chromium prometheus:prometheus systemd-analyze:systemd
tools:
	@missing=""; for pair in $(APT_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "install:$$missing (Debian: sudo apt-get install$$missing)" >&2; exit 1; fi; fi

test: $(STAMP) tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python bench/queue.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
