"""Benchmarks (measurements, not tests): ``python -m bench.gpu`` for the GPU kernels; the other
modules time the CPU paths."""
