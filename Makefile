# runner-gateway: the commands the README gives.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ENV    ?=

.PHONY: all install demo run token test lint format docker bench bench-smoke clean

all: test

# The virtual environment, with the package installed editable and the
# test and lint tools. Re-made when setup.cfg changes.
$(BIN)/twistd: setup.cfg setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	@touch $@

install: $(BIN)/twistd

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
