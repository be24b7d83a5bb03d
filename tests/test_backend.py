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


def test_module_source_changes_with_any_header(tmp_path, monkeypatch):
    """CuPy caches compiled modules by source text and options only: the text we hand it must
    change when a header it includes changes, or an updated tissuesim would run stale kernels."""
    (tmp_path / "k.cu").write_text('#include "h.cuh"\nextern "C" __global__ void k() {}\n')
    (tmp_path / "h.cuh").write_text("#define A 1\n")
    (tmp_path / "other.cuh").write_text("#define B 1\n")
    monkeypatch.setattr(bk, "kernel_dir", lambda: tmp_path)
    first = bk.module_source("k.cu")
    assert first.startswith(bk.kernel_source("k.cu")) and bk.module_source("k.cu") == first
    (tmp_path / "h.cuh").write_text("#define A 2\n")
    second = bk.module_source("k.cu")
    assert second != first
    (tmp_path / "other.cuh").write_text("#define B 2\n")
    assert bk.module_source("k.cu") not in (first, second)


def test_raw_module_is_built_from_the_module_source(monkeypatch):
    """get_kernel's module gets module_source (with the headers' digest), not the bare file."""
    import sys
    import types

    made = {}

    class RawModule:
        def __init__(self, code, options, name_expressions):
            made.update(code=code, options=options)

        def get_function(self, name):
            return name

    class Device:
        def __init__(self, d):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(Device=Device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    bk._module.cache_clear()
    try:
        be = bk.Backend("cupy", fake, 0)
        assert bk.get_kernel(be, "agents.cu", "move_cells") == "move_cells"
    finally:
        bk._module.cache_clear()
    assert made["code"] == bk.module_source("agents.cu") != bk.kernel_source("agents.cu")
