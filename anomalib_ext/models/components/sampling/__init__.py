"""Bounded samples of training data: a reservoir and greedy k-center coresets."""

from .memory_bank import ReservoirSampler, greedy_coreset_indices, grouped_greedy_coreset_indices, random_projection

__all__ = ["ReservoirSampler", "greedy_coreset_indices", "grouped_greedy_coreset_indices", "random_projection"]
