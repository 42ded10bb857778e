"""Robustness suite: bad input, faults, deployment parity and determinism (issue 8)."""
