#!/usr/bin/env python
"""`python scripts/make_synth_data.py ...` = `dvlm-make-data ...` (dvlm_exp/evaluation/data/cli.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.evaluation.data.cli")
