"""`synth_video_caption` scoring: lexical caption metrics, plus the LLM-judge score when a judge is active.

Lexical metrics (labelled `lexical_*`; they measure word overlap with the one reference, not
correctness): ROUGE-L, BLEU-4 and CIDEr from pycocoevalcap, computed over the whole corpus by the
aggregation functions below, on lower-cased whitespace tokens (`normalize`). No PTBTokenizer,
METEOR or SPICE: those need Java. Note CIDEr's IDF comes from the evaluated references, so it is
0 on a single sample and depends on `limit`.

Judge score (`judge_score`, 0-5 detail orientation, video_dc499's prompt): only when the runner
activated a judge (`dvlm_exp.evaluation.judge.active()`, `judge=openai ...`); otherwise the metric is absent
(predict-only: score later with `python scripts/judge.py <run_dir>`).
"""

from __future__ import annotations

import os

LEXICAL = ("lexical_rouge_l", "lexical_bleu4", "lexical_cider")
JUDGE_METRIC = "judge_score"


def doc_to_visual(doc):
    path = doc["video_path"]
    if not os.path.isfile(path):  # lmms-eval's own video tasks sys.exit() here; raise with the fix instead
        raise FileNotFoundError(f"synth_video_caption: video {path} is missing; delete its dataset folder "
                                f"({os.path.dirname(os.path.dirname(path))}) to regenerate it")
    return [path]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answer"]


def normalize(text) -> str:
    """Lower-cased, whitespace-tokenized (tokens joined by single spaces)."""
    return " ".join(str(text if text is not None else "").lower().split())


def lexical_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus ROUGE-L / BLEU-4 / CIDEr (pycocoevalcap) of predictions vs their references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        return {k: 0.0 for k in LEXICAL}
    res = {i: [normalize(p)] for i, p in enumerate(predictions)}
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"lexical_rouge_l": float(rouge), "lexical_bleu4": float(bleu[3]), "lexical_cider": float(cider)}


def process_results(doc, results):
    from dvlm_exp.evaluation import judge

    pred = results[0] if results else ""
    item = {"pred": pred, "refs": [doc["answer"]]}
    out = {k: item for k in LEXICAL}
    j = judge.active()
    if j is not None:
        score, review = j.score(doc["question"], doc["answer"], pred)
        out[JUDGE_METRIC] = {"score": score, "review": review}
    return out


def _corpus(items, key):
    return lexical_scores([it["pred"] for it in items], [it["refs"] for it in items])[key]


def agg_rouge_l(items):
    return _corpus(items, "lexical_rouge_l")


def agg_bleu4(items):
    return _corpus(items, "lexical_bleu4")


def agg_cider(items):
    return _corpus(items, "lexical_cider")


def agg_judge(items):
    from dvlm_exp.evaluation.judge import mean_score

    return mean_score(items)
