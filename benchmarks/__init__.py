"""Benchmarks: each runs its reference in the same process and prints a ratio (`python -m benchmarks.NAME`)."""
