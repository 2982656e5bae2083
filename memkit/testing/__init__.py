"""Shared test suites: every backend's test subclasses :class:`BankConformance`."""

from memkit.testing.conformance import BankConformance

__all__ = ["BankConformance"]
