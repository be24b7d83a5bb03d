"""Shared fixtures: every physics test runs on each available backend.

``be`` is parametrised over numpy and cupy; the cupy case skips cleanly where no GPU answers, so
the same suite is the CPU check in CI and the GPU check on a GPU machine.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import re
import shutil
import subprocess
import traceback
from pathlib import Path

import numpy as np
import pytest

from tissuesim import backend as bk
from tissuesim.backend import NUMPY, cupy_status, select_backend

_CUPY_OK, _CUPY_WHY = cupy_status()


def gpu_available() -> bool:
    return _CUPY_OK


requires_gpu = pytest.mark.skipif(not _CUPY_OK, reason=f"no GPU: {_CUPY_WHY}")


@pytest.fixture(scope="session")
def build_host_kernels(tmp_path_factory):
    """build(name, shim) -> ctypes.CDLL: the CUDA sources that ``shim`` (a .cpp in tests/)
    includes, built for the host with g++ into lib<name>.so and loaded; skips where g++ is missing.

    The shim supplies the CUDA built-ins (tests/fields/cuda_host_shim.cpp); -ffp-contract=off, as
    NVRTC's --fmad=false, keeps fused multiply-adds out, so float arithmetic rounds as NumPy's.
    """

    built: dict = {}  # by shim: a shim is built once per session whoever asks

    def build(name: str, shim: Path):
        key = Path(shim).resolve()
        if key in built:
            return built[key]
        cxx = shutil.which("g++")
        if cxx is None:
            pytest.skip("g++ not found: no host emulation of the CUDA kernels")
        tmp = tmp_path_factory.mktemp(f"emu_{name}")
        out = tmp / f"lib{name}.so"
        # the shim plus a thread loop per kernel (emu_loop_<kernel>), so a launch is one ctypes call
        src = tmp / f"{name}_loops.cpp"
        src.write_text(f'#include "{key}"\n' + _thread_loops(key.read_text()))
        flags = ["-std=c++20", "-O1", "-ffp-contract=off", "-shared", "-fPIC"]
        inc = [f"-I{bk.kernel_dir()}", f"-I{Path(__file__).resolve().parent / 'fields'}", f"-I{key.parent}"]
        res = subprocess.run(
            [cxx, *flags, *inc, str(src), "-o", str(out), "-pthread"], capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr
        lib = ctypes.CDLL(str(out))
        lib.emu_set_1d.argtypes = [ctypes.c_uint] * 6
        lib.emu_set_1d.restype = None
        built[key] = lib
        return lib

    return build


_KERNEL_RE = r'extern "C" __global__ void (\w+)\s*\(([^)]*)\)'


def _thread_loops(shim_text: str) -> str:
    """C++ of emu_loop_<kernel>(order, nthreads, grid, block, <the kernel's parameters>) for every
    extern "C" kernel of the kernels/*.cu files the shim includes: the kernel's threads in the
    given order (int64 thread indices), each after emu_set_1d, as EmulatedKernel otherwise runs
    them one ctypes call at a time. Templated kernels (parameters of type T) get none."""
    out = []
    for fname in re.findall(r'#include "(\w+\.cu)"', shim_text):
        for name, params in re.findall(_KERNEL_RE, bk.kernel_source(fname)):
            if re.search(r"\bT\b", params):
                continue
            names = [p.replace("*", " ").split()[-1] for p in params.split(",")]
            out.append(
                f'extern "C" void emu_loop_{name}(const long long* emu_order, long long emu_n, '
                f"unsigned emu_grid, unsigned emu_block, {params}) {{\n"
                "    for (long long q = 0; q < emu_n; ++q) {\n"
                "        const long long t = emu_order[q];\n"
                "        emu_set_1d(emu_grid, 1, emu_block, (unsigned)(t / emu_block), 0, (unsigned)(t % emu_block));\n"
                f"        {name}({', '.join(names)});\n"
                "    }\n}\n"
            )
    return "\n".join(out)


#: C types of kernel parameters -> NumPy dtypes (pointers) and scalar types (values)
KERNEL_PTR_TYPES = {
    "float": np.float32,
    "double": np.float64,
    "unsigned char": np.uint8,
    "int": np.int32,
    "unsigned int": np.uint32,
    "i64": np.int64,
    "long long": np.int64,
    "unsigned long long": np.uint64,
}
KERNEL_SCALAR_TYPES = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "i64": np.int64,
    "long long": np.int64,
    "float": np.float32,
    "double": np.float64,
}


@pytest.fixture(scope="session")
def kernel_signatures():
    """signatures(filename) -> {kernel: [("ptr", dtype, const) or ("val", scalar type, False)]}
    for every extern "C" kernel of kernels/<filename>."""

    def signatures(filename: str) -> dict[str, list[tuple]]:
        src = bk.kernel_source(filename)
        sigs = {}
        for name, params in re.findall(r'extern "C" __global__ void (\w+)\s*\(([^)]*)\)', src):
            kinds = []
            for p in params.split(","):
                toks = p.replace("__restrict__", " ").replace("*", " * ").split()
                base = " ".join(t for t in toks[:-1] if t not in ("const", "*"))
                if "*" in toks:
                    kinds.append(("ptr", np.dtype(KERNEL_PTR_TYPES[base]), "const" in toks))
                else:
                    kinds.append(("val", KERNEL_SCALAR_TYPES[base], False))
            sigs[name] = kinds
        return sigs

    return signatures


_CTYPE = {
    np.int32: ctypes.c_int32,
    np.uint32: ctypes.c_uint32,
    np.int64: ctypes.c_int64,
    np.float32: ctypes.c_float,
    np.float64: ctypes.c_double,
}
EMU_GUARD = 64  # poisoned bytes on each side of every array handed to an emulated kernel
# float32 guards read as 3.4e38 and float64 ones as NaN (an out-of-bounds read shows in the
# results), others as 0xA5A5...
_POISON = {np.dtype(np.float32): 0x7F, np.dtype(np.float64): 0xFF}


def _thread_order(order: str, nthreads: int, seed: int) -> np.ndarray:
    t = np.arange(nthreads)
    if order == "reverse":
        return t[::-1]
    if order == "shuffle":
        return np.random.default_rng(seed).permutation(nthreads)
    return t


class EmulatedKernel:
    """Stands in for a cupy.RawKernel whose source was built for the host (build_host_kernels):
    same call, strict checks, host run.

    ``sig`` is the kernel's entry of kernel_signatures; ``order`` is "forward", "reverse" or
    "shuffle" (the order the threads of the real grid run in, one by one); each call appends
    (name, args) to ``log``. Checks: argument count, pointer dtypes and C-contiguity, scalar types,
    a 1D launch shape; every array runs inside poisoned guard bytes that must come back untouched
    (out-of-bounds writes), const arrays must come back unchanged and no written array may alias
    another argument (__restrict__)."""

    def __init__(self, lib, name: str, sig: list[tuple], order: str, log: list):
        self.lib, self.name, self.sig, self.order, self.log = lib, name, sig, order, log

    def __call__(self, grid, block, args):
        nm = self.name
        assert isinstance(args, tuple), f"{nm}: arguments as {type(args)}"
        assert len(args) == len(self.sig), f"{nm}: {len(args)} arguments, signature has {len(self.sig)}"
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        assert all(isinstance(g, int) and g >= 1 for g in grid + block), (grid, block)
        assert grid[1:] == (1, 1) and block[1:] == (1, 1), f"{nm}: the kernels index in x only"
        assert block[0] <= 1024 and grid[0] < 2**31
        cargs, arrays = [], []
        for k, ((kind, t, const), a) in enumerate(zip(self.sig, args)):
            if kind == "ptr":
                assert isinstance(a, np.ndarray), f"{nm} arg {k}: pointer argument is {type(a)}"
                assert a.dtype == t, f"{nm} arg {k}: array of {a.dtype} where {t} expected"
                assert a.flags.c_contiguous, f"{nm} arg {k}: non-contiguous array"
                raw = a.reshape(-1).view(np.uint8)
                poison = _POISON.get(a.dtype, 0xA5)
                buf = np.full(raw.size + 2 * EMU_GUARD, poison, dtype=np.uint8)
                buf[EMU_GUARD : EMU_GUARD + raw.size] = raw
                arrays.append((k, a, raw, buf, poison, const, raw.copy() if const else None))
                cargs.append(ctypes.c_void_p(buf.ctypes.data + EMU_GUARD))
            else:
                assert type(a) is t, f"{nm} arg {k}: scalar {a!r} ({type(a)}) where {t} expected"
                cargs.append(_CTYPE[t](a))
        # __restrict__ (and plain sanity): an array written by the kernel aliases no other argument
        for x, (kx, ax, *_, cx, _bx) in enumerate(arrays):
            for ky, ay, *_, cy, _by in arrays[x + 1 :]:
                if not (cx and cy):
                    assert not np.may_share_memory(ax, ay), f"{nm}: arguments {kx} and {ky} overlap"
        nb, bs = grid[0], block[0]
        order = np.ascontiguousarray(_thread_order(self.order, nb * bs, len(self.log)), dtype=np.int64)
        loop = getattr(self.lib, f"emu_loop_{nm}", None)
        if loop is not None:  # the same threads in the same order, looped in C
            loop(ctypes.c_void_p(order.ctypes.data), ctypes.c_int64(order.size), nb, bs, *cargs)
        else:
            fn = getattr(self.lib, nm)
            for t in order.tolist():
                self.lib.emu_set_1d(nb, 1, bs, t // bs, 0, t % bs)
                fn(*cargs)
        for k, _a, raw, buf, poison, const, before in arrays:
            assert (buf[:EMU_GUARD] == poison).all(), f"{nm}: write before the start of argument {k}"
            assert (buf[EMU_GUARD + raw.size :] == poison).all(), f"{nm}: write past the end of argument {k}"
            body = buf[EMU_GUARD : EMU_GUARD + raw.size]
            if const:
                assert np.array_equal(body, before), f"{nm}: const argument {k} was written"
            else:
                raw[...] = body
        self.log.append((nm, args))


@pytest.fixture(scope="session")
def emulated_kernel():
    """The EmulatedKernel class, for tests that drive host-built kernels through CuPy code."""
    return EmulatedKernel


_DIFFUSION_C_TYPES = {
    "const T*": "pT",
    "T*": "pT",
    "const int*": "pi",
    "int*": "pi",
    "const double*": "pd",
    "double*": "pd",
    "int": "i32",
    "i64": "i64",
    "T": "T",
    "double": "f64",
}


def _diffusion_signatures() -> dict[str, list[str]]:
    """Parameter kinds of every extern "C" kernel, parsed from kernels/diffusion.cu."""
    src = bk.kernel_source("diffusion.cu")
    sigs = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)_##SFX\(([^)]*)\)', src):
        kinds = []
        for p in params.replace("\\", " ").split(","):
            ctype = " ".join(p.split()[:-1]).replace(" *", "*")
            kinds.append(_DIFFUSION_C_TYPES[ctype])
        sigs[name] = kinds
    return sigs


class _FieldsEmulatedKernel:
    """Stands in for a cupy.RawKernel of diffusion.cu (built with tests/fields/cuda_host_shim.cpp):
    same call convention, strict argument checks, host run."""

    def __init__(self, lib, name: str, sfx: str, sig: list[str]):
        self.lib, self.name, self.sfx, self.sig = lib, name, sfx, sig
        self.T = np.float32 if sfx == "f32" else np.float64

    def _convert(self, kind, a):
        arrays = {"pT": self.T, "pi": np.int32, "pd": np.float64}
        scalars = {"i32": np.int32, "i64": np.int64, "T": self.T, "f64": np.float64}
        if kind in arrays:
            assert isinstance(a, np.ndarray), f"{self.name}: pointer argument is {type(a)}"
            assert a.dtype == arrays[kind], f"{self.name}: array of {a.dtype} where {arrays[kind]} expected"
            assert a.flags.c_contiguous, f"{self.name}: non-contiguous array"
            return ctypes.c_void_p(a.ctypes.data)
        assert type(a) is scalars[kind], (
            f"{self.name}: scalar {a!r} ({type(a)}) where {scalars[kind]} expected"
        )
        return _CTYPE[scalars[kind]](a)

    def __call__(self, grid, block, args):
        assert len(args) == len(self.sig), (
            f"{self.name}: {len(args)} arguments, signature has {len(self.sig)}"
        )
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        assert all(isinstance(g, int) and g >= 1 for g in grid + block)
        assert block[0] * block[1] * block[2] <= 1024 and grid[1] <= 65535 and grid[2] <= 65535
        cargs = [self._convert(k, a) for k, a in zip(self.sig, args)]
        if self.name == "fields_transpose_xy":
            assert block == (32, 8, 1), "the transpose kernel is written for 32 x 8 blocks"
            f = getattr(self.lib, f"emu_transpose_{self.sfx}")
            f(*cargs, *(ctypes.c_uint(v) for v in (grid[0], grid[1], grid[2], block[0], block[1])))
            return
        assert grid[2] == block[1] == block[2] == 1
        # grid-stride loops in x: a small emulated launch must cover every element as the real one
        # does; y (the field index where used) is emulated in full.
        g, b = min(grid[0], 3), min(block[0], 5)
        fn = getattr(self.lib, f"{self.name}_{self.sfx}")
        for by in range(grid[1]):
            for bi in range(g):
                for ti in range(b):
                    self.lib.emu_set_1d(g, grid[1], b, bi, by, ti)
                    fn(*cargs)


@pytest.fixture(scope="session")
def fields_emulation():
    """Kernel(lib, name, sfx, sig) and signatures() for the templated kernels of diffusion.cu."""
    import types

    return types.SimpleNamespace(Kernel=_FieldsEmulatedKernel, signatures=_diffusion_signatures)


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


# --------------------------------------------------------------------------- CuPy, emulated


class _Emulation:
    """State of the emulated CuPy: whether its strict checks apply (not inside an emulated kernel
    or the tests' own bookkeeping) and, while ``counting``, what it saw as (what, where): host
    waits (reads of device data, synchronize) and uploads of host data (which CuPy stages
    through pinned memory without waiting, but which CUDA stream capture cannot replay)."""

    def __init__(self):
        self.strict = True
        self.counting = False
        self.waits: list[tuple[str, str]] = []
        self.uploads: list[tuple[str, str]] = []
        self.stream = None  # the current stream of the emulated CuPy
        self.pinned: dict[int, np.ndarray] = {}  # pinned host buffers by address
        self.ops: collections.Counter = collections.Counter()  # device operations by kind
        self.op_sites: collections.Counter = collections.Counter()  # ... by tissuesim function

    def op(self, kind: str) -> None:
        """One device operation (a kernel launch in CuPy, roughly: some launch two or three)."""
        if self.counting and self.strict:
            self.ops[kind] += 1
            where = _caller()
            self.op_sites[f"{where.split(':')[0]} {where.rsplit(' ', 1)[-1]}"] += 1

    def wait(self, what: str) -> None:
        if self.counting and self.strict:
            self.waits.append((what, _caller()))

    def upload(self, what: str) -> None:
        if self.counting and self.strict:
            self.uploads.append((what, _caller()))

    @contextlib.contextmanager
    def counted(self):
        """Count waits, uploads and operations inside the block."""
        self.counting = True
        try:
            yield self
        finally:
            self.counting = False

    @contextlib.contextmanager
    def lenient(self):
        old, self.strict = self.strict, False
        try:
            yield
        finally:
            self.strict = old


_EMU = _Emulation()


def _caller() -> str:
    """file:line of the innermost tissuesim frame (the code that caused a host wait)."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        if "tissuesim" in fr.filename and "tests" not in Path(fr.filename).parts:
            if fr.name in ("asnumpy", "device_constant") and Path(fr.filename).name == "backend.py":
                continue  # helpers: who called them is the news
            return f"{Path(fr.filename).name}:{fr.lineno} ({fr.name})"
    return "?"


def _is_host(a) -> bool:
    return isinstance(a, np.ndarray) and not isinstance(a, _DeviceArray)


def _dev(r):
    """A result of NumPy as CuPy gives it: arrays stay on the device, scalars are 0-d arrays."""
    if isinstance(r, _DeviceArray):
        return r
    if isinstance(r, np.ndarray):
        return r.view(_DeviceArray)
    if isinstance(r, np.generic):
        return np.asarray(r).view(_DeviceArray)
    if isinstance(r, tuple):
        return tuple(_dev(x) for x in r)
    return r


def _refuse_host(where: str, args) -> None:
    """CuPy refuses NumPy arrays as operands (TypeError: Unsupported type numpy.ndarray)."""
    if not _EMU.strict:
        return
    for a in args:
        if isinstance(a, (list, tuple)):
            _refuse_host(where, a)
        elif _is_host(a):
            raise TypeError(f"emulated CuPy: a NumPy array {a.dtype}{a.shape} passed to {where}")


def _is_mask(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, np.ndarray) and k.dtype == np.bool_ and k.ndim > 0 for k in keys)


def _has_host_index(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(_is_host(k) or isinstance(k, list) for k in keys)


def _has_device_index(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, _DeviceArray) and k.ndim > 0 for k in keys)


def _plain(x):
    """Device arrays as plain NumPy arrays, through lists, tuples and dicts."""
    if isinstance(x, _DeviceArray):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _count_reads(name: str, args) -> None:
    """The host waits CuPy's function ``name`` makes (the size of its result depends on data)."""
    if name == "bincount":  # cupy.bincount: (x < 0).any() and int(x.max())
        _EMU.wait("xp.bincount (negative check)")
        _EMU.wait("xp.bincount (length)")
    elif name in _READING or (name == "where" and len(args) == 1):
        _EMU.wait(f"xp.{name}")
    elif name == "repeat" and len(args) > 1 and isinstance(args[1], np.ndarray) and args[1].ndim:
        _EMU.wait("xp.repeat(array repeats)")


class _DeviceArray(np.ndarray):
    """A NumPy array standing in for a cupy.ndarray, as strict as CuPy where it matters here:
    operations with NumPy arrays raise TypeError, scalars come back as 0-d device arrays, and
    what makes the host wait for the GPU in CuPy (reading a value: bool(), int(), float(),
    .item(), .tolist(), .get(); boolean-mask indexing, which reads the mask's count) is counted
    by _EMU. ``.data.copy_from_host_async(ptr, nbytes, stream)`` uploads as a MemoryPointer."""

    @property
    def data(self):
        arr = self

        class _MemoryPointer:
            def copy_from_host_async(self, ptr, nbytes, stream):
                assert stream is _EMU.stream, f"upload on {stream!r}, not the current stream"
                assert isinstance(ptr, int) and nbytes == arr.nbytes, (ptr, nbytes, arr.nbytes)
                assert ptr in _EMU.pinned, "an asynchronous upload from memory that is not pinned"
                ctypes.memmove(arr.ctypes.data, ptr, nbytes)

        return _MemoryPointer()

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        _refuse_host(f"{ufunc.__name__}", inputs + tuple(out))
        _EMU.op(f"ufunc {ufunc.__name__}")
        plain = [x.view(np.ndarray) if isinstance(x, _DeviceArray) else x for x in inputs]
        if out:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, _DeviceArray) else o for o in out)
        r = getattr(ufunc, method)(*plain, **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _dev(r)

    def __getitem__(self, key):
        if _is_mask(key):
            _EMU.wait("boolean mask index")
        elif _has_host_index(key):
            _EMU.upload("host index array")
        if _is_mask(key) or _has_host_index(key) or _has_device_index(key):
            _EMU.op("gather")  # basic indexing makes a view: no launch
        return _dev(super().__getitem__(key))

    def __setitem__(self, key, value):
        if _is_mask(key):
            _EMU.wait("boolean mask assignment")
        host_value = (_is_host(value) and value.ndim > 0) or isinstance(value, (list, tuple))
        if host_value:
            fancy = _is_mask(key) or _has_host_index(key) or _has_device_index(key)
            if _EMU.strict and not fancy:
                # CuPy fills basic-index targets with y.fill(value): a non-scalar NumPy value raises
                raise ValueError("emulated CuPy: non-scalar numpy.ndarray cannot be used for fill")
            _EMU.upload("host values assigned")
        if _has_host_index(key):
            _EMU.upload("host index array")
        _EMU.op("assign")
        super().__setitem__(key, value)

    def __array_function__(self, func, types, args, kwargs):
        # NumPy functions on device arrays go to CuPy's (NEP 18), which refuse host operands
        name = func.__name__
        _refuse_host(f"np.{name}", args + tuple(kwargs.values()))
        _count_reads(name, args)
        if name not in _NO_LAUNCH:
            _EMU.op(f"xp.{name}")
        with _EMU.lenient():
            r = super().__array_function__(func, types, _plain(args), _plain(kwargs))
        return _dev(r)

    def _read(self, what):
        _EMU.wait(what)
        return self.view(np.ndarray)

    def __bool__(self):
        return bool(self._read("bool()"))

    def __int__(self):
        return int(self._read("int()"))

    def __float__(self):
        return float(self._read("float()"))

    def __index__(self):
        return self._read("index").__index__()

    def item(self, *a):
        return self._read(".item()").item(*a)

    def tolist(self):
        return self._read(".tolist()").tolist()

    def get(self, stream=None, order="C", out=None, blocking=True):
        return _emulated_asnumpy(self, stream, order, out, blocking)

    def fill(self, value):
        _EMU.op(".fill()")
        self.view(np.ndarray).fill(value)

    def sort(self, *a, **k):
        _EMU.op(".sort()")
        self.view(np.ndarray).sort(*a, **k)

    def nonzero(self):
        _EMU.wait(".nonzero()")
        return _dev(self.view(np.ndarray).nonzero())


for _name in (
    "any", "all", "sum", "max", "min", "mean", "prod", "argmax", "argmin",
    "cumsum", "argsort", "take", "clip", "astype", "copy",
):  # fmt: skip

    def _reduction(self, *a, _name=_name, **k):
        if not (
            _name == "astype" and k.get("copy") is False and np.dtype(a[0] if a else k["dtype"]) == self.dtype
        ):
            _EMU.op(f".{_name}()")  # astype(same dtype, copy=False) returns the array itself
        return _dev(getattr(self.view(np.ndarray), _name)(*a, **k))

    setattr(_DeviceArray, _name, _reduction)


def _emulated_asnumpy(a, stream=None, order="C", out=None, blocking=True):
    assert stream is None or isinstance(stream, _FakeStream)
    if isinstance(a, _DeviceArray) and blocking:  # of host data: no device read at all
        _EMU.wait("asnumpy")
    a = a.view(np.ndarray) if isinstance(a, np.ndarray) else np.asarray(a)
    if out is None:
        return np.array(a, order=order)
    with _EMU.lenient():
        out[...] = a
    return out


#: xp functions that read device data in CuPy (the size of their result depends on the data)
_READING = {"flatnonzero", "nonzero", "argwhere", "unique", "compress", "extract"}
#: xp functions that launch nothing (views, metadata, dtypes)
_NO_LAUNCH = {
    "reshape", "ravel", "moveaxis", "swapaxes", "transpose", "squeeze", "expand_dims",
    "atleast_1d", "atleast_2d", "atleast_3d", "broadcast_to", "broadcast_arrays", "shape", "ndim",
    "size", "result_type", "promote_types", "can_cast", "iinfo", "finfo", "dtype",
    "empty", "empty_like",
}  # fmt: skip
#: xp functions that return a device bool in CuPy where NumPy returns a Python bool
_DEVICE_BOOL = {"array_equal", "array_equiv", "allclose"}
#: xp functions that take host data (uploads: the host waits for a pageable copy)
_UPLOADING = {"asarray", "array", "asanyarray"}


def _no_copy(name: str, args, kwargs) -> bool:
    """Whether xp.ascontiguousarray / xp.asarray of a device array returns it as it is (CuPy
    launches nothing then: already C-contiguous, and of the dtype asked for, if any)."""
    if name not in ("ascontiguousarray", "asarray") or not args or not isinstance(args[0], _DeviceArray):
        return False
    dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
    a = args[0]
    same = dtype is None or np.dtype(dtype) == a.dtype
    return same and (name == "asarray" or a.flags.c_contiguous)


def _emulated_function(name, fn):
    def call(*args, **kwargs):
        if name in _UPLOADING:
            src = args[0] if args else kwargs.get("a", kwargs.get("obj"))
            if not isinstance(src, _DeviceArray):
                if isinstance(src, (np.ndarray, list, tuple)):
                    _EMU.upload(f"xp.{name}(host data)")
                with _EMU.lenient():
                    return _dev(np.array(src, dtype=kwargs.get("dtype", args[1] if len(args) > 1 else None)))
            if name != "asarray" or not _no_copy(name, args, kwargs):  # a conversion (or array()) copies
                _EMU.op(f"xp.{name}")
            return _dev(fn(*args, **kwargs))
        _refuse_host(f"xp.{name}", args + tuple(kwargs.values()))
        _count_reads(name, args)
        if name not in _NO_LAUNCH and not _no_copy(name, args, kwargs):
            # (called with plain arrays: __array_ufunc__ does not count)
            _EMU.op(f"ufunc {name}" if isinstance(fn, np.ufunc) else f"xp.{name}")
        with _EMU.lenient():
            r = fn(*_plain(args), **_plain(kwargs))
        if name in _DEVICE_BOOL:
            return np.asarray(r).view(_DeviceArray)
        return _dev(r)

    return call


def _emulated_xp():
    """The emulated cupy module: NumPy's functions behind _emulated_function (device results,
    host operands refused, reads counted), plus asnumpy and the cuda namespace."""
    import types as _types

    ns = {}
    for k in dir(np):
        if k.startswith("__"):
            continue
        v = getattr(np, k)
        if isinstance(v, np.ufunc) or (
            callable(v) and not isinstance(v, type) and not isinstance(v, _types.ModuleType)
        ):
            ns[k] = _emulated_function(k, v)
        else:
            ns[k] = v
    xp = _types.SimpleNamespace(**ns)
    xp.asnumpy = _emulated_asnumpy
    return xp


class _FakeStream:
    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_event(self, event) -> None:
        assert isinstance(event, _FakeEvent)

    def synchronize(self) -> None:
        _EMU.wait("Stream.synchronize")


class _FakeEvent:
    """A recorded event: not done at the first query, done from the second on (so the code that
    waits for a copy still in flight runs too)."""

    def __init__(self):
        self._queries = 0

    @property
    def done(self) -> bool:
        self._queries += 1
        return self._queries > 1

    def record(self, stream=None) -> None:
        assert stream is None or isinstance(stream, _FakeStream)

    def synchronize(self) -> None:
        _EMU.wait("Event.synchronize")


class _FakeDevice:
    def __init__(self, device=0):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self) -> None:
        _EMU.wait("Device.synchronize")

    def use(self) -> None:
        pass


@pytest.fixture(scope="session")
def _emulated_libs(build_host_kernels):
    here = Path(__file__).resolve().parent
    libs = {
        "agents.cu": build_host_kernels("emu_agents_sim", here / "agents" / "cuda_host_shim_agents.cpp"),
        "blood.cu": build_host_kernels("emu_blood_sim", here / "biology" / "cuda_host_shim_blood.cpp"),
        "diffusion.cu": build_host_kernels("emu_fields_sim", here / "fields" / "cuda_host_shim.cpp"),
    }
    libs["blood.cu"].blood_step.restype = None
    return libs


@pytest.fixture
def emulated_cupy(monkeypatch, _emulated_libs, kernel_signatures, fields_emulation):
    """A Backend named "cupy" whose arrays are NumPy arrays and whose kernels are the CUDA sources
    of kernels/ built for the host (agents.cu, blood.cu, diffusion.cu), each launch checked by
    EmulatedKernel / the fields harness; streams, events, pinned buffers and scatter_add are
    synchronous stand-ins. Simulations made with ``backend=cupy`` get it. So the whole CuPy code
    path of a step runs on a machine without a GPU; what it cannot show: CuPy's own behaviour
    (asynchrony, implicit-sync rules, its element-wise kernels) and the GPU's arithmetic. The field
    step runs as plain launches (CUDA graph capture needs a GPU). ``.xp.launches`` lists the
    emulated kernel launches as (name, args)."""
    import sys
    import types

    from tissuesim import simulation
    from tissuesim.agents import _kernels as agents_kernels
    from tissuesim.fields import _device as fields_device
    from tissuesim.fields.fieldset import FieldSet

    xp = _emulated_xp()
    null = _FakeStream()
    xp.cuda = types.SimpleNamespace(
        Device=_FakeDevice,
        Stream=_FakeStream,
        Event=_FakeEvent,
        get_current_stream=lambda: null,
        runtime=types.SimpleNamespace(getDeviceProperties=lambda d: {"name": b"emulated"}),
    )
    be = bk.Backend("cupy", xp, 0)
    log: list = []
    agents_sigs = kernel_signatures("agents.cu")
    blood_sigs = kernel_signatures("blood.cu")
    fields_sigs = fields_emulation.signatures()
    libs = _emulated_libs

    def get_kernel(b, filename, name, options=(), name_expressions=None):
        assert b is be, "a kernel asked for on another backend"
        if filename == "diffusion.cu":
            base, sfx = name.rsplit("_", 1)
            kern = fields_emulation.Kernel(libs[filename], base, sfx, fields_sigs[base])
        else:
            sigs = agents_sigs if filename == "agents.cu" else blood_sigs
            assert tuple(options) == ("--fmad=false",), (filename, options)
            kern = EmulatedKernel(libs[filename], name, sigs[name], "forward", [])

        def launch(grid, block, args):
            _refuse_host(f"kernel {name}", args)  # RawKernel: Unsupported type numpy.ndarray
            if name == "blood_step":  # one thread integrates the whole compartment
                assert tuple(grid) == tuple(block) == (1,), (grid, block)
            log.append((name, args))
            _EMU.op(f"kernel {name}")
            with _EMU.lenient():
                kern(
                    grid, block, tuple(a.view(np.ndarray) if isinstance(a, _DeviceArray) else a for a in args)
                )

        return launch

    def pinned(shape, dtype=np.float64):
        a = np.empty(shape, dtype=dtype)
        _EMU.pinned[a.ctypes.data] = a  # listed, and kept alive while listed
        return a

    def scatter_add(a, index, value):
        _refuse_host("cupyx.scatter_add", (a, index, value))
        with _EMU.lenient():
            np.add.at(a.view(np.ndarray), index, value)

    monkeypatch.setitem(
        sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=pinned, scatter_add=scatter_add)
    )
    monkeypatch.setattr(bk, "get_kernel", get_kernel)
    monkeypatch.setattr(agents_kernels, "get_kernel", get_kernel)
    monkeypatch.setattr(fields_device, "backend_of", lambda a: be if isinstance(a, np.ndarray) else NUMPY)
    monkeypatch.setattr(FieldSet, "_step_graph", lambda self, *a: self._step_now(*a))
    real = simulation.select_backend
    monkeypatch.setattr(
        simulation, "select_backend", lambda name, *a: be if name == "cupy" else real(name, *a)
    )
    xp.launches = log
    xp.emulation = _EMU
    _EMU.counting, _EMU.waits, _EMU.uploads, _EMU.strict = False, [], [], True
    _EMU.stream, _EMU.pinned = null, {}
    _EMU.ops, _EMU.op_sites = collections.Counter(), collections.Counter()
    # device tables of this module stay out of the real CuPy's cache (device 0 both)
    monkeypatch.setattr(bk, "_CONSTANTS", {})
    return be


@pytest.fixture
def emulated_cupy_numpy_fields(emulated_cupy, monkeypatch):
    """emulated_cupy, with the fields of its Simulations on their NumPy twins: the emulated field
    kernels (tests/fields/test_kernels.py checks them against the twins) cost ~0.3 s a launch on
    a 96 x 96 grid, too slow for runs of hundreds of steps; the cells, biology and blood keep the
    emulated CuPy path."""
    from tissuesim.fields.fieldset import FieldSet

    init, step = FieldSet.__init__, FieldSet.step

    def numpy_fields(self, *a, **k):
        init(self, *a, **k)
        if self.be is emulated_cupy:
            self.be, self.xp, self.use_graph = NUMPY, np, False

    def numpy_step(self, *a, **k):  # the twins work on the (emulated) device arrays in place
        with _EMU.lenient():
            step(self, *a, **k)

    monkeypatch.setattr(FieldSet, "__init__", numpy_fields)
    monkeypatch.setattr(FieldSet, "step", numpy_step)
    return emulated_cupy
