"""Evaluations behind ``memkit eval``: perplexity and passkey retrieval."""
