"""LLaDA-V's own DocVQA / InfoVQA scoring: ANLS on the text after the last "Answer:".

LLaDA-V's lmms-eval fork (ML-GSAI/LLaDA-V, eval/lmms-eval/lmms_eval/tasks/{docvqa,infovqa}) asks
"Give the reason and then write your final answer in the format 'Answer: X' ..." and parses the
final answer out of the reply before ANLS (threshold 0.5). Prompt building and the metric are
lmms-eval 0.7.3's own (`lmms_eval.tasks.docvqa.utils`, `lmms_eval.api.metrics.anls`); only the
parsing lives here.

Differences from the official `parse_VWImodel_response` (documented, deliberate):
- a reply without "Answer:" is scored as the whole reply (stripped), where the official code
  scores the string "None" (use ``parse_answer(text, strict=True)`` for that behaviour);
- the answer is everything after the last "Answer:", where the official code keeps only the part
  after the reply's last ":" (it turns "Answer: 10:30" into "30").
Both only matter for replies the official parser would get wrong or score 0.
"""

from __future__ import annotations

MARKER = "Answer:"


def parse_answer(text: str | None, strict: bool = False) -> str | None:
    """The final answer in a "reason ... Answer: X" reply.

    Markdown emphasis ("**Answer:** X") is removed first; the text after the last "Answer:" is
    stripped of whitespace and of surrounding ".", ",". Without "Answer:", the whole reply,
    stripped (or None with ``strict=True``, as the official parser).
    """
    if text is None:
        return None
    text = text.replace("*", "")
    i = text.rfind(MARKER)
    if i == -1:
        return None if strict else text.strip()
    return text[i + len(MARKER):].strip().strip("., ")


def process_results(doc, results):
    from lmms_eval.api.metrics import anls

    pred = parse_answer(results[0].strip() if results else "")
    gold = doc["answers"]
    if not isinstance(gold, (list, tuple)):
        gold = [gold]
    return anls(references=list(gold), predictions=[pred if pred is not None else "None"])
