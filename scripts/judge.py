#!/usr/bin/env python
"""`python scripts/judge.py ...` = `dvlm-judge ...` (dvlm_exp/evaluation/judge_cli.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.evaluation.judge_cli")
