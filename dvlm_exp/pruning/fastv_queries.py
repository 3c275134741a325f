"""Query sets FastV can score with (kept torch-free so config checks can list them)."""

QUERY_SETS = ("last_token", "all", "masked_response", "last_prompt_token")
SCORES = ("head_mean_softmax", "softmax_of_head_mean_logits")
ORDERS = ("position", "score")
