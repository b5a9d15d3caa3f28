"""Benchmarks for fastattnreg ops: a shared harness (harness.py), one bench_<op>.py per op, plot.py."""
