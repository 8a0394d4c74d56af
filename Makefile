# The README's two commands: `make demo` and `make test`. Each builds .venv from scratch if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export EGL_PLATFORM ?= surfaceless
LINT_PATHS := splitedge edge server deploy models tests

.PHONY: install demo test test-slow lint protos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned first: any other torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[edge,server,gl,camera,train,measure,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/splitedge demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy edge server splitedge

# Two workers, one per core; a test file stays on one worker (its module fixtures are built once).
test: lint
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=15

# The slowest end-to-end tests, which CI leaves out (see the slow marker in pyproject.toml).
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/policy.proto

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
