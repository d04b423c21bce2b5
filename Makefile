# The two set-up commands of the README. Both create .venv and install what they need.
# CPU machines get the CPU torch wheel (torch==2.13.0); on a GPU machine install your CUDA torch first
# and run `pip install -e .` instead of the `[cpu]` extra.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e ".[cpu,test,demo,prometheus,serve]"
	# lmms-eval without its dependency list (it would replace the CPU torch): integrations/lmms_eval/requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps lmms-eval==0.7.3
	$(BIN)/pip install -q --disable-pip-version-check -r integrations/lmms_eval/requirements.txt

demo: setup
	$(BIN)/realb-hf demo

# -rs: every skipped test is listed with its reason at the end (Chromium, a CUDA GPU: see README "What the tests need")
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -x -p no:cacheprovider -rs
