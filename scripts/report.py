#!/usr/bin/env python
"""`python scripts/report.py ...` = `dvlm-report ...` (dvlm_exp/reporting/cli.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.reporting.cli")
