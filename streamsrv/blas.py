"""numpy's BLAS kept to the calling thread, in every process that runs a model.

numpy's OpenBLAS starts a thread per core for the one matrix product of Whisper's feature
extraction (the mel filterbank) and leaves those threads spinning between calls, on the cores
CTranslate2 needs: with one thread, 4 live calls took 0.16 to 0.19 CPU s per audio s instead
of 0.31 to 0.33, and the post-call worker 8 to 10 % less time (benchmarks/RESULTS.md). The
product is small enough that threads bring it nothing.
"""

from __future__ import annotations

import numpy  # noqa: F401  (loads the BLAS library, which threadpoolctl only finds once loaded)
from threadpoolctl import threadpool_limits


def one_blas_thread() -> None:
    threadpool_limits(limits=1, user_api="blas")
