"""Subcommand implementations of the memkit CLI (one module each)."""
