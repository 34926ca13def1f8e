"""Benchmarks: workloads, ceilings measured in the same run, JSON results."""
