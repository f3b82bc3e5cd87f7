"""Processes that run a model keep numpy's BLAS on the calling thread (see streamsrv.blas)."""

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from streamsrv.blas import one_blas_thread


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_numpy_blas_is_limited_to_one_thread() -> None:
    assert np.ones(1) @ np.ones(1) == 1.0  # numpy and its BLAS are loaded
    before = blas_threads()
    assert before
    try:
        one_blas_thread()
        assert blas_threads() == [1] * len(before)
    finally:
        threadpool_limits(limits=max(before))
