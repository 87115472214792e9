"""Benchmarks: `python -m bench.gpu` (issue 6's benchmark), `bench.cpu` (gRPC overhead), `bench.kernels`.

Benchmarks are never timed tests: they print a table and write JSON under bench/results/.
"""
