PY ?= python3

.PHONY: install test bench run
install:            ## install everything (torch, transformers, lmms-eval, hydra+submitit, wandb, ...)
	bash scripts/install.sh

test:               ## the whole test suite (CPU, offline)
	$(PY) -m pytest -q tests

bench:              ## measured vs FLOPs-predicted speedup on a mid-size random model (JSON last line)
	$(PY) scripts/bench.py

run:                ## the main job on the embedded default
	$(PY) run.py
