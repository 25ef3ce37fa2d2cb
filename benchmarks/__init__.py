"""Benchmarks and the application runner (not installed with the library)."""
