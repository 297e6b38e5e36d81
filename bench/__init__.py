"""Benchmarks. Scripts, not tests: they print figures and assert nothing about timing."""
