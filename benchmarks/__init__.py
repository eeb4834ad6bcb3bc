"""Benchmarks that print fedssd's speed figures (run ``python -m benchmarks.bench``)."""
