"""Benchmarks behind ``memkit bench`` (installed as ``memkit.bench``): results as JSON, PNG plots and markdown tables.

They live under ``benchmarks/`` beside their results; the library never imports them (``memkit bench`` reaches them
through the CLI's command table).
"""
