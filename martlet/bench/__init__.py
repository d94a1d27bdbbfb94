"""Benchmarks: kernels, offline engine (latency, throughput) and serving."""
