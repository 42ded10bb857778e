"""Pieces of tools/benchmark.py: argument specs, dataset splits, the per-cell runner and the report."""
