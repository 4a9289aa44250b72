"""Benchmarks: each measures its baseline in the same run and prints the ratio (bench/README.md)."""
