#!/usr/bin/env python
"""`python scripts/plan_flops.py ...` = `dvlm-plan-flops ...` (dvlm_exp/reporting/plan_cli.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.reporting.plan_cli")
