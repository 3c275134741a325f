#!/usr/bin/env python
"""`python scripts/train_tiny.py ...` = `dvlm-train-sandbox ...` (dvlm_exp/models/train_sandbox.py), in the project's venv."""
import _entry

_entry.run("dvlm_exp.models.train_sandbox")
