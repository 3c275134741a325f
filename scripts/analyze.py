#!/usr/bin/env python
"""`python scripts/analyze.py ...` = `dvlm-analyze ...` (dvlm_exp/analysis/cli.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.analysis.cli")
