"""Helpers for multi-peer tests and demos: a tiny model, offline data, and a peer process launcher.

Nothing here is needed for training; it exists so that tests, benchmarks and ``make demo`` share one peer program.
"""
