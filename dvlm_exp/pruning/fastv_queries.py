"""Query sets FastV can score with (kept torch-free so config checks can list them)."""

QUERY_SETS = ("last_token", "all", "masked_response", "last_prompt_token")
