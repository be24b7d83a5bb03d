"""Backend selection and the kernel loader."""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim import backend as bk


def test_numpy_backend_is_numpy():
    be = bk.select_backend("numpy")
    assert be.xp is np and be.device is None and not be.is_gpu


def test_auto_picks_numpy_without_gpu():
    ok, _ = bk.cupy_status()
    be = bk.select_backend("auto")
    assert be.name == ("cupy" if ok else "numpy")


def test_cupy_without_gpu_is_a_clear_error():
    ok, _ = bk.cupy_status()
    if ok:
        pytest.skip("a GPU answers here")
    with pytest.raises(bk.BackendError, match=r"^backend=cupy: no usable GPU here: .*use backend=numpy"):
        bk.select_backend("cupy")


def test_unknown_backend_name():
    with pytest.raises(bk.BackendError, match="allowed values are auto, numpy, cupy"):
        bk.select_backend("opencl")


def test_multirun_jobs_spread_over_gpus():
    n = bk.gpu_count()
    if n == 0:
        pytest.skip("no GPU")
    for job in range(2 * n):
        assert bk.select_backend("cupy", None, job_num=job).device == job % n


def test_bad_device_index():
    n = bk.gpu_count()
    if n == 0:
        pytest.skip("no GPU")
    with pytest.raises(bk.BackendError, match=f"device={n}: allowed are 0..{n - 1}"):
        bk.select_backend("cupy", n)


def test_kernel_dir_holds_the_sources():
    assert bk.kernel_dir().name == "kernels"
    for p in bk.kernel_files():
        assert p.suffix == ".cu"
