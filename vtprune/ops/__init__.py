"""Shared numerical pieces: top-k, greedy selection loops, the attention probe."""
