"""Shared fixtures: every physics test runs on each available backend.

``be`` is parametrised over numpy and cupy; the cupy case skips cleanly where no GPU answers, so
the same suite is the CPU check in CI and the GPU check on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim.backend import NUMPY, cupy_status, select_backend

_CUPY_OK, _CUPY_WHY = cupy_status()


def gpu_available() -> bool:
    return _CUPY_OK


requires_gpu = pytest.mark.skipif(not _CUPY_OK, reason=f"no GPU: {_CUPY_WHY}")


def nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=[pytest.mark.gpu, requires_gpu])])
def be(request):
    """A Backend: numpy always, cupy where a GPU answers."""
    if request.param == "numpy":
        return NUMPY
    return select_backend("cupy")


def pytest_collection_modifyitems(config, items):
    """Tests that take the ``gpu_be`` fixture are GPU tests: mark them so ``-m gpu`` selects them."""
    for item in items:
        if "gpu_be" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def gpu_be():
    """The cupy backend, or skip."""
    if not _CUPY_OK:
        pytest.skip(f"no GPU: {_CUPY_WHY}")
    return select_backend("cupy")


class _Recorder:
    """A run writer that keeps copies of the snapshots it is given and the checkpoint times, in
    order (log entries ("snapshot", day, fields, agents) and ("checkpoint", day))."""

    def __init__(self):
        self.log = []

    def write_snapshot(self, day, fields, agents):
        copy = {k: np.array(v) for k, v in fields.items()}, {k: np.array(v) for k, v in agents.items()}
        self.log.append(("snapshot", day, *copy))

    def write_checkpoint(self, day, arrays, meta):
        self.log.append(("checkpoint", day))

    def write_timeseries(self, day, row):
        pass

    def write_event(self, day, what, detail):
        pass


@pytest.fixture
def recorder():
    """The class of a writer that records what a Simulation.run writes (see _Recorder)."""
    return _Recorder
