# The Python every target uses: the active virtualenv or conda env, else the project's .venv
# (made by `make install`). Override with `make PY=/path/to/python ...`.
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PY ?= python
else
PY ?= .venv/bin/python
endif
ARGS ?=

.PHONY: install lock test bench run
install:            ## the locked environment (requirements.lock) in .venv or the active env
	PY=$(PY) bash scripts/install.sh

lock:               ## re-resolve requirements.in into requirements.lock (then: make install test)
	bash scripts/lock.sh

test:               ## the whole test suite (CPU, offline)
	$(PY) -m pytest -q tests

bench:              ## measured vs FLOPs-predicted speedup on a mid-size random model (JSON last line)
	$(PY) scripts/bench.py $(ARGS)

run:                ## the main job on the embedded default (extra overrides: make run ARGS="prune=fastv")
	$(PY) run.py $(ARGS)
