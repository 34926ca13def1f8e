"""Sequences, KV cache, sampling and the LLMEngine (add_request / step / generate / stream)."""
