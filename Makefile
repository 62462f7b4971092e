# `make demo` and `make test` each create .venv and install everything first (idempotent).
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-slow lint bench clean

install: $(STAMP)

# torch first and pinned (the CPU wheel on disk); constraints keep every later resolve on it.
$(STAMP): pyproject.toml constraints.txt
	command -v dot >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq graphviz >/dev/null) || echo "warning: Graphviz (apt graphviz) \
	  not installed: lineage pictures fall back to a column layout"
	command -v chromium >/dev/null && test -x /usr/bin/chromedriver || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	  >/dev/null) || echo "warning: Chromium (apt chromium chromium-driver) not installed: \
	  tests/test_browser_slow.py will fail"
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q -c constraints.txt torch==2.13.0 2>&1 | grep -v "is ignored: it is neither" || true
	$(PIP) install -q -c constraints.txt -e '.[dev,ray]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch, prefect, mlflow, transformers, trl, flows.cli" && touch $(STAMP)

demo: install
	.venv/bin/posttrain run recipes/mimo_tiny.yaml

test: install
	$(PY) -m pytest -q -m "not slow" --durations=10

test-slow: install
	$(PY) -m pytest -q -m slow --durations=20

lint: install
	.venv/bin/ruff check .

bench: install
	$(PY) bench/plan_speed.py

clean:
	rm -rf .posttrain
