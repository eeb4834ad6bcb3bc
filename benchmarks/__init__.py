"""Benchmarks that print fedssd's speed figures (run ``python -m benchmarks.bench``).

Importing fedssd first sets the OpenMP wait policy training runs with (:mod:`fedssd.openmp`):
it must be in the environment before PyTorch loads, and every benchmark module imports torch.
"""

import fedssd  # noqa: F401
