# runner-gateway: the commands the README gives.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENV    ?=

.PHONY: all install lock demo run token test test-fastpath-off test-floor test-newest \
        matrix lint format docker bench bench-smoke clean

all: test

# The lock: requirements/runtime.txt (the image) and requirements/dev.txt
# (runtime, test and dev tools: make install, CI), exact versions with hashes.
LOCK := requirements/runtime.txt requirements/dev.txt
COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
          --custom-compile-command 'make lock' --upgrade setup.cfg

# The virtual environment: the locked set, then the package itself, editable.
# Re-made when setup.cfg or the lock changes.
$(BIN)/twistd: setup.cfg setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	@touch $@

install: $(BIN)/twistd

# Re-resolve the lock to the newest releases setup.cfg admits (docs/deploy.md).
lock: install
	$(COMPILE) -o requirements/runtime.txt
	$(COMPILE) --extra test --extra dev -c requirements/runtime.txt -o requirements/dev.txt

# A working gateway in front of the stand-in runner: no Ollama needed.
demo: install
	$(BIN)/python -m runner_gateway.demo

# The gateway in front of a real Ollama on 127.0.0.1:11434 (settings/settings.yaml,
# overlaid by settings/$(ENV).yaml when ENV is given). Makes a key pair on first use.
run: install
	@test -f settings/paseto.pub || $(BIN)/paseto-tool -action=asymmetric
	$(BIN)/twistd -n --pidfile= runner-gateway $(if $(ENV),--env $(ENV))

# A v4.public token: make token SUB=alice [ENV=my-domain] [ARGS='-scope=inference -exp=720h']
token: install
	@test -n "$(SUB)" || { echo "usage: make token SUB=name [ENV=...] [ARGS=...]" >&2; exit 2; }
	@test -f settings/paseto.key || $(BIN)/paseto-tool -action=asymmetric
	@$(BIN)/paseto-tool -action=public -sub=$(SUB) $(if $(ENV),-env=$(ENV)) $(ARGS)

test: install
	$(BIN)/pytest

# The version matrix (README "Supported versions"); .ci/run runs it.
test-fastpath-off: install
	RUNNER_GATEWAY_FASTPATH=off $(BIN)/pytest

test-floor: install
	UV=$(BIN)/uv bin/matrix floor

test-newest: install
	UV=$(BIN)/uv bin/matrix newest

matrix: test test-fastpath-off test-floor test-newest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docker:
	docker build -t runner-gateway .

bench: install
	$(BIN)/python -m bench.run

bench-smoke: install
	$(BIN)/python -m bench.run --smoke

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
