"""Evaluation: greedy generation scored by exact match, and the paper datasets' own metrics."""
