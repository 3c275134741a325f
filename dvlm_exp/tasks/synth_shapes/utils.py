"""`synth_shapes` (the sandbox task): one- or two-word answers scored by exact match after
`dvlm_exp.evaluation.data.synth_shapes.normalize` (lower case, no punctuation, no "and")."""

from __future__ import annotations

from dvlm_exp.evaluation.data.synth_shapes import POST_PROMPT, normalize


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', POST_PROMPT)}"


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    pred = results[0] if results else ""
    return {"exact_match": float(normalize(pred) == doc["answer"])}
