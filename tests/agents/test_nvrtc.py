"""kernels/agents.cu compiles with NVRTC for sm_80 and sm_90 (no GPU needed)."""

from __future__ import annotations

import pytest

from tissuesim import backend as bk
from tissuesim.agents import _kernels as K


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_agents_cu_compiles(arch):
    from cupy_backends.cuda.libs import nvrtc

    nvrtc.getVersion()  # NVRTC is a required test dependency here: fail, do not skip
    cubin = bk.compile_cubin(K.FILENAME, arch, options=K.OPTIONS)
    assert len(cubin) > 1000
    for name in K.KERNEL_NAMES:
        assert name.encode() in cubin, name
