"""Benchmarks of Pallas TPU kernels on CPU: XLA reference, JAX's interpret
modes, and fast_interpret. Run ``python -m benchmarks --help``."""
