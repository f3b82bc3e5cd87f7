"""numpy's BLAS kept to the calling thread, in every process that runs a model.

numpy's OpenBLAS starts a thread per core for the one matrix product of Whisper's feature
extraction (the mel filterbank) and leaves those threads spinning between calls, on the cores
CTranslate2 needs: with one thread, 4 live calls took 0.20 CPU s per audio s instead of 0.31,
and the post-call worker 8 % less time (benchmarks/RESULTS.md). The product is small enough
that threads bring it nothing.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def one_blas_thread() -> None:
    threadpool_limits(limits=1, user_api="blas")
