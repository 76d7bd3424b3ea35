# Two commands for a fresh machine (Python 3.10+ with venv):
#   make demo   set up .venv and run the main job: sense-jax pipeline -> runs/pipeline/report/
#   make test   set up .venv (with test dependencies) and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
OUT ?= runs/pipeline

.PHONY: demo test bench convert-demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sense-jax pipeline --out $(OUT)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

convert-demo: $(VENV)/.installed
	$(PY) -m eval.demo

bench: $(VENV)/.installed
	$(PY) -m eval.bench_encoder
	$(PY) -m eval.bench_extract
	$(PY) -m eval.bench_kmeans
	$(PY) -m eval.bench_distill
	$(PY) -m eval.bench_families

clean:
	rm -rf $(VENV) .pytest_cache
