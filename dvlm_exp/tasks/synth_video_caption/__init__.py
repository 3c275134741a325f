"""Synthetic video captioning (offline mp4 clips; lexical metrics + optional LLM judge)."""
