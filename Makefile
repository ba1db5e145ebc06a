# Quick start: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision installed when the venv has none. On this project's CPU machines these two lie on
# disk; transformers' video processors (Qwen2-VL, SmolVLM, LLaVA-OneVision) need torchvision beside torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.lvlm-probe-installed
PYTEST_ARGS ?=

.PHONY: setup test demo lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install $(TORCH_SPEC)
	@# Pin whatever torch/torchvision the venv now has, so no dependency swaps them (GPU users keep their build).
	@$(PY) -m pip freeze --all | grep -iE '^(torch|torchvision)==' > $(VENV)/torch-constraints.txt
	$(PY) -m pip install -c $(VENV)/torch-constraints.txt -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/lvlm-probe demo
	$(VENV)/bin/lvlm-probe sweep probes/shapes_objects.yaml
	$(VENV)/bin/lvlm-probe attribute --model shapes-llava --world 60 --out runs/attribution
	$(VENV)/bin/lvlm-probe report --model shapes-llava --out runs/report

lint: setup
	$(VENV)/bin/ruff check lvlm_probe tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
