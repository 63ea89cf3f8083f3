"""Capacity: one search (fewest GPUs, longest S) over predict(S, W); attention and whole-model front ends."""
