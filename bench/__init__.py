"""Benchmarks: python -m bench.<name>."""

import os

# numpy's bundled OpenBLAS starts a thread pool at import whose threads spin on the cores being measured; nothing
# timed here uses numpy's BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
