#!/usr/bin/env python
"""`python scripts/bench.py ...` = `dvlm-bench ...` (dvlm_exp/reporting/bench.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.reporting.bench")
