"""LLaDA-V's own DocVQA / InfoVQA tasks ("Answer: X" prompt and parsing)."""
