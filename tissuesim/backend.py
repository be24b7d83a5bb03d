"""The one place that picks NumPy or CuPy, the GPU, and loads CUDA kernels.

``backend=auto`` takes CuPy when it imports and a CUDA device answers, else NumPy; ``cupy`` on a
machine without a usable GPU is an error, never a silent fallback. Everything else in tissuesim
asks a :class:`Backend` for its array module (``be.xp``) instead of importing numpy or cupy.

Kernels live as real CUDA C files in ``kernels/``. :func:`get_kernel` compiles them once per
device through ``cupy.RawModule`` (NVRTC) and memoizes the module on top of CuPy's own disk
cache, after the pattern of cupyx.scipy.ndimage.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "numpy", "cupy")

#: NVRTC options every kernel is built with. -I points at kernels/ so sources can include the
#: shared headers; no host headers are used (NVRTC has none).
NVRTC_STD = "--std=c++17"


class BackendError(RuntimeError):
    """The requested backend or device cannot be used here."""


def kernel_dir() -> Path:
    """Folder holding the CUDA sources (*.cu, *.cuh).

    A wheel carries them inside the package (tissuesim/kernels); an editable install or a source
    checkout reads the repository's top-level kernels/.
    """
    here = Path(__file__).resolve().parent
    for cand in (here / "kernels", here.parent / "kernels"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"kernels/ not found next to {here}")


def kernel_source(filename: str) -> str:
    """Text of one kernel file in kernels/."""
    return (kernel_dir() / filename).read_text()


def module_source(filename: str) -> str:
    """The text handed to cupy.RawModule for kernels/<filename>: the file, then a comment with
    the SHA-256 of every header (*.cuh) in kernels/. CuPy's kernel cache (~/.cupy/kernel_cache)
    is keyed by the source text and options, not by what the source includes, so without the
    digest an edited header (a new tissuesim version) would run stale cached code."""
    import hashlib

    h = hashlib.sha256()
    for hdr in sorted(kernel_dir().glob("*.cuh")):
        h.update(hdr.name.encode() + b"\0" + hdr.read_bytes() + b"\0")
    return f"{kernel_source(filename)}\n// kernels/*.cuh sha256 {h.hexdigest()}\n"


def kernel_files() -> list[Path]:
    """Every compilable CUDA source (*.cu) in kernels/, sorted."""
    return sorted(kernel_dir().glob("*.cu"))


#: what CuPy adds to every NVRTC build of a RawModule: float32 subnormal inputs and results are
#: flushed to zero on the GPU (not by the NumPy twins; no effect on float64). Results differ
#: only where a float32 value falls below 1.18e-38.
CUPY_FTZ = "-ftz=true"


def nvrtc_options(extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    return (NVRTC_STD, f"-I{kernel_dir()}", *extra)


def cupy_status() -> tuple[bool, str]:
    """(usable, reason): whether CuPy imports and at least one CUDA device answers."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"cupy does not import ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"no CUDA device answers ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if n < 1:
        return False, "no CUDA device found"
    return True, f"{n} CUDA device(s)"


def gpu_count() -> int:
    ok, _ = cupy_status()
    if not ok:
        return 0
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


@dataclass(frozen=True)
class Backend:
    """An architecture as a value: which array module, which device.

    name : 'numpy' or 'cupy'.
    xp : the array module (numpy or cupy).
    device : CUDA device index for cupy, None for numpy.
    """

    name: str
    xp: ModuleType = field(repr=False)
    device: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.name == "cupy"

    def asnumpy(self, a) -> np.ndarray:
        """Copy an array of this backend to host memory (a sync point on the GPU)."""
        if self.is_gpu:
            return self.xp.asnumpy(a)
        return np.asarray(a)

    def asarray(self, a, dtype=None):
        """Put a host array on this backend's device."""
        return self.xp.asarray(a, dtype=dtype)

    def synchronize(self) -> None:
        if self.is_gpu:
            self.xp.cuda.Device(self.device).synchronize()

    def use(self):
        """Context manager making this backend's device current (no-op for numpy)."""
        if self.is_gpu:
            return self.xp.cuda.Device(self.device)
        import contextlib

        return contextlib.nullcontext()

    def describe(self) -> str:
        if not self.is_gpu:
            return "numpy (CPU)"
        props = self.xp.cuda.runtime.getDeviceProperties(self.device)
        name = props["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return f"cupy on GPU {self.device} ({name})"


NUMPY = Backend("numpy", np, None)


def select_backend(name: str = "auto", device: int | None = None, job_num: int | None = None) -> Backend:
    """Pick the backend and device.

    name : 'auto' | 'numpy' | 'cupy'.
    device : CUDA device index; None lets tissuesim choose (0, or in a multirun the job number
        modulo the GPU count, so jobs launched side by side spread over the GPUs).
    job_num : Hydra's job number in a multirun, else None.
    """
    if name not in BACKENDS:
        raise BackendError(f"backend={name!r}: allowed values are {', '.join(BACKENDS)}")
    if name == "numpy":
        if device is not None:
            log.warning("device=%s ignored: backend is numpy", device)
        return NUMPY
    ok, reason = cupy_status()
    if not ok:
        if name == "cupy":
            raise BackendError(
                f"backend=cupy: no usable GPU here: {reason}; use backend=numpy or backend=auto"
            )
        log.info("backend=auto: using numpy, because %s", reason)
        return NUMPY
    import cupy

    n = cupy.cuda.runtime.getDeviceCount()
    if device is None:
        device = (job_num % n) if job_num is not None else 0
    elif not 0 <= device < n:
        raise BackendError(f"device={device}: allowed are 0..{n - 1} ({n} CUDA device(s) here)")
    be = Backend("cupy", cupy, int(device))
    # Make it the current device of this thread: every array and kernel launch that follows
    # (CuPy allocates on the current device) lands on the GPU that was chosen.
    cupy.cuda.Device(be.device).use()
    cupy.zeros(1).sum().item()  # make sure the device really answers
    return be


@functools.cache
def _module(device: int, filename: str, options: tuple[str, ...], name_expressions: tuple[str, ...] | None):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.RawModule(
            code=module_source(filename),
            options=nvrtc_options(options),
            name_expressions=name_expressions,
        )


def get_kernel(
    be: Backend,
    filename: str,
    name: str,
    options: tuple[str, ...] = (),
    name_expressions: tuple[str, ...] | None = None,
):
    """A compiled kernel from kernels/<filename>, memoized per (device, file, options).

    ``name`` is the extern "C" symbol, or one of ``name_expressions`` for templated kernels.
    Scalars passed to the kernel must carry explicit dtypes (np.int32, np.float32): CuPy does not
    check them against the signature.
    """
    if not be.is_gpu:
        raise BackendError("get_kernel needs the cupy backend")
    mod = _module(be.device, filename, tuple(options), tuple(name_expressions) if name_expressions else None)
    return mod.get_function(name)


def compile_cubin(filename: str, arch: str, options: tuple[str, ...] = (), name_expressions=()) -> bytes:
    """Compile one kernel file with NVRTC for ``arch`` (e.g. 'sm_80') without needing a GPU.

    Used by the tests to prove every kernel builds for the GPUs we support. Raises RuntimeError
    with NVRTC's log on failure. ``name_expressions`` instantiates templated kernels.
    """
    from cupy_backends.cuda.libs import nvrtc

    src = module_source(filename)
    prog = nvrtc.createProgram(src, filename, [], [])
    try:
        for ne in name_expressions:
            nvrtc.addNameExpression(prog, ne)
        # CuPy appends -ftz=true to every NVRTC build (cupy/cuda/compiler.py), after ours, and the
        # last one wins: float32 subnormals flush to zero on the GPU. Build what CuPy builds.
        opts = [*nvrtc_options(options), f"-arch={arch}", CUPY_FTZ]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            raise RuntimeError(f"{filename} ({arch}): {exc}\n{nvrtc.getProgramLog(prog)}") from exc
        return nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)


_CONSTANTS: dict = {}


def device_constant(be: Backend, host: np.ndarray):
    """A small host table (per-type parameters, ...) as an array of ``be``, made once per content.

    On the GPU the copy happens the first time only: a copy from host memory inside a step
    stages through CuPy's pinned pool (host work, and nothing CUDA stream capture can replay).
    Tables are keyed by their bytes, so callers may rebuild them every step on the host for free.
    On numpy the host array itself is returned.
    """
    if not be.is_gpu:
        return host
    return device_table(be.xp, host, be.device)


def device_table(xp, host: np.ndarray, device=None, in_capture: bool = True):
    """``host`` as an array of the array module ``xp`` on ``device`` (a CuPy Device, its number,
    or None for the current one), made once per content and cached (device_constant's cache).

    Entries belong to one array module (a second one, such as the tests' emulated CuPy, gets its
    own). ``in_capture=False``: return None instead of making a missing entry while a CUDA stream
    capture records (the upload would only be recorded, and the cache would keep uninitialised
    memory)."""
    host = np.ascontiguousarray(host)
    key = (id(xp), str(device), host.dtype.str, host.shape, host.tobytes())
    hit = _CONSTANTS.get(key)
    if hit is not None and hit[0] is xp:  # an id can be reused once its module is gone
        return hit[1]
    if not in_capture:
        cuda = getattr(xp, "cuda", None)
        stream = cuda.get_current_stream() if cuda is not None else None
        if stream is not None and getattr(stream, "is_capturing", lambda: False)():
            return None
    if len(_CONSTANTS) >= 512:
        _CONSTANTS.clear()
    # made on ``device``, which need not be the current one
    with device if hasattr(device, "__enter__") else contextlib.nullcontext():
        hit = _CONSTANTS[key] = (xp, xp.asarray(host))
    return hit[1]


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def scatter_add(xp: ModuleType, a, index, value) -> None:
    """``a[index] += value`` with repeated indices accumulated (numpy.add.at), in place.

    On CuPy this is one atomic-add kernel and never synchronises (``xp.bincount`` reads the
    largest index back to size its result). Integer counts are exact in any order; CuPy's
    atomics take int32, uint32, uint64 and float32/float64 ``a``.
    """
    if xp is np:
        np.add.at(a, index, value)
    else:
        import cupyx

        cupyx.scatter_add(a, index, value)
