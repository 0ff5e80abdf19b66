"""Benchmarks: commands that print tables, never timed asserts."""
