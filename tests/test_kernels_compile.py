"""Every CUDA source in kernels/ compiles with NVRTC for the GPUs we support (no GPU needed)."""

from __future__ import annotations

import pytest

from tissuesim import backend as bk


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        return nvrtc.getVersion()
    except Exception as exc:  # cupy or the NVRTC wheel missing
        pytest.skip(f"NVRTC not available: {exc}")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("path", bk.kernel_files(), ids=lambda p: p.name)
def test_kernel_compiles(path, arch):
    _nvrtc()
    cubin = bk.compile_cubin(path.name, arch)
    assert len(cubin) > 0


def test_broken_kernel_fails_with_log(tmp_path, monkeypatch):
    """The check can fail: a syntax error gives RuntimeError with NVRTC's log."""
    _nvrtc()
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void k(float* a) { a[0] = ; }\n')
    monkeypatch.setattr(bk, "kernel_dir", lambda: tmp_path)
    with pytest.raises(RuntimeError, match=r"broken\.cu"):
        bk.compile_cubin("broken.cu", "sm_80")
