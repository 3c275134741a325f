#!/usr/bin/env python
"""`python scripts/sweep_jobs.py ...` = `dvlm-sweep-jobs ...` (dvlm_exp/run/sweep_jobs.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.run.sweep_jobs")
