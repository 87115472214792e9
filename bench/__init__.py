"""Benchmarks: `python -m bench.gpu` (the performance targets), `bench.cpu` (gRPC overhead), `bench.kernels`.

Benchmarks are never timed tests: they print a table and write JSON under bench/results/.
"""
