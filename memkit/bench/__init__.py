"""Benchmarks behind ``memkit bench``: results as JSON, PNG plots and markdown tables."""
