"""The native backend: the compiled ops of csrc/ + bindings/ (namespace `impasto_native::`).

Where the library comes from, first found wins:
    1. `impasto._native`, built by `IMPASTO_BUILD_NATIVE=1 pip install --no-build-isolation -e .`;
    2. the file named by IMPASTO_NATIVE_LIB (a library `build()` made earlier);
    3. `build()`: a JIT build with torch.utils.cpp_extension (g++, plus nvcc where torch has
       CUDA and a toolkit is found) into a cache folder keyed by the torch and Python versions,
       so a second build in the same folder only relinks or reloads.
Nothing is loaded or built at import unless (1) exists; `load()` tries (1) and (2).

The ops keep the Python ops' schemas minus `backend`; their fake kernels are registered here
(torch.compile and opcheck use them), their dispatch entries below (backend "native").
The CPU default: `dispatch.NATIVE_CPU_DEFAULT` names the ops the benchmark showed faster than
the reference (benchmarks/RESULTS.md, "Native CPU kernels").
"""

import functools
import glob
import hashlib
import importlib.util
import os
import sys
import threading

import torch

from . import dispatch

NAMESPACE = "impasto_native"
ENV_LIB = "IMPASTO_NATIVE_LIB"
ENV_BUILD_DIR = "IMPASTO_NATIVE_BUILD_DIR"
OPS = ("lora_apply_", "lora_delta", "lora_delta_backward", "guidance_blend_", "rank1_edit", "rank1_edit_backward")
# The repository root (editable installs and checkouts); csrc/ and bindings/ live there.
# realpath: benchmarks/gpu_check.sh reaches this file through a symlinked shim package.
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
# -ffp-contract=off: the guidance blend must round as PyTorch's separate ops do (no implied FMA).
CFLAGS = ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp-simd"]
CUDA_CFLAGS = ["-O3", "-std=c++17", "-fmad=false"]
CUDA_ARCHS = ("80", "90")

_lock = threading.Lock()
_state = {"origin": None, "error": "not loaded: build with IMPASTO_BUILD_NATIVE=1 pip install, or call impasto.kernels.native.build()"}

_NATIVE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Finding, loading and building the library
# ----------------------------------------------------------------------------------------------


def sources(cuda: bool) -> list[str]:
    """The C++ (and, with cuda, CUDA) files of the extension, relative paths under ROOT."""
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) + [os.path.join(ROOT, "bindings", "ops.cpp")]
    if cuda:
        files += sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu"))) + [os.path.join(ROOT, "bindings", "ops_cuda.cpp")]
    return files


def cuda_buildable() -> tuple[bool, str]:
    """Whether the CUDA part can be built here, and why not."""
    if torch.version.cuda is None:
        return False, "torch has no CUDA (a CPU build)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (CUDA_HOME)"
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there gives a folder
    # without the toolkit's headers, and the build would fail late with a compiler error
    if not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        return False, f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (set CUDA_HOME to the toolkit)"
    return True, ""


def loaded() -> bool:
    return _state["origin"] is not None


def origin() -> str | None:
    """What was loaded: "impasto._native", or the library's path; None if nothing."""
    return _state["origin"]


def has_cuda_kernels() -> bool:
    return loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::lora_apply_", "CUDA")


def reasons(device_type: str) -> list[str]:
    """Why the native backend cannot run on `device_type` (empty: it can). Tries `load()` once."""
    if not loaded():
        load()
    if not loaded():
        return [f"the native extension is {_state['error']}"]
    if device_type == "cpu":
        return []
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return ["torch has no CUDA device"]
        if not has_cuda_kernels():
            return ["the native extension was built without its CUDA part"]
        return []
    return [f"the native extension has no kernels for device type {device_type!r}"]


@functools.cache
def _setup_spec() -> bool:
    try:
        return importlib.util.find_spec("impasto._native") is not None
    except ModuleNotFoundError:  # impasto.kernels imported without its parent package
        return False


def load() -> bool:
    """Load the setup.py build or IMPASTO_NATIVE_LIB if present; True if the ops are registered."""
    with _lock:
        if loaded():
            return True
        try:
            if _setup_spec():
                importlib.import_module("impasto._native")
                _finish("impasto._native")
            elif os.environ.get(ENV_LIB):
                path = os.environ[ENV_LIB]
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{ENV_LIB}={path!r} is not a file")
                torch.ops.load_library(path)
                _finish(path)
        except Exception as e:  # a broken build is a reason, never an import error
            _state["error"] = f"not loadable: {type(e).__name__}: {e}"
        return loaded()


def default_build_dir() -> str:
    """~/.cache/impasto/native/<torch, python and source hash>, or IMPASTO_NATIVE_BUILD_DIR."""
    if os.environ.get(ENV_BUILD_DIR):
        return os.environ[ENV_BUILD_DIR]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "impasto", "native", tag)


def build(build_dir: str | None = None, *, cuda: bool | None = None, verbose: bool = False) -> str:
    """JIT-build the extension (CPU, plus CUDA if `cuda` or, by default, where buildable), load it.

    Returns the library's path. Ninja rebuilds only what changed in `build_dir`, so a cached
    folder costs a reload. Raises if another copy of the library is already loaded from elsewhere
    (two libraries cannot both own the namespace).
    """
    from torch.utils import cpp_extension

    want_cuda, why = cuda_buildable()
    if cuda and not want_cuda:
        raise RuntimeError(f"cannot build the CUDA part: {why}")
    want_cuda = want_cuda if cuda is None else cuda
    files = sources(want_cuda)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"native sources missing (an install without csrc/ and bindings/?): {missing}")
    build_dir = build_dir or default_build_dir()
    name = "impasto_native_cuda" if want_cuda else "impasto_native_cpu"
    build_dir = os.path.join(build_dir, name)
    os.makedirs(build_dir, exist_ok=True)
    with _lock:
        path = os.path.join(build_dir, name + ".so")
        if loaded():
            if _state["origin"] == path:
                return path
            raise RuntimeError(f"the native extension is already loaded from {_state['origin']}")
        cuda_flags = list(CUDA_CFLAGS)
        for arch in CUDA_ARCHS:
            cuda_flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        cpp_extension.load(
            name=name,
            sources=files,
            extra_cflags=CFLAGS,
            extra_cuda_cflags=cuda_flags,
            build_directory=build_dir,
            is_python_module=False,
            verbose=verbose,
        )
        _finish(path)
    return path


def source_hash() -> str:
    """A hash of the native sources (for callers that key their own caches on them)."""
    h = hashlib.sha256()
    for f in sources(cuda=True):
        if os.path.isfile(f):
            with open(f, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _finish(origin: str) -> None:
    missing = [op for op in OPS if not hasattr(getattr(torch.ops, NAMESPACE), op)]
    if missing:
        raise RuntimeError(f"the native library at {origin} lacks the ops {missing}")
    _register_fakes()
    _state["origin"] = origin
    _state["error"] = None


# ----------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, for torch.compile and opcheck
# ----------------------------------------------------------------------------------------------

_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    lib = NAMESPACE

    @torch.library.register_fake(f"{lib}::lora_apply_")
    def _(y, x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats):
        return None

    @torch.library.register_fake(f"{lib}::lora_delta")
    def _(x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats):
        return x.new_empty(*x.shape[:2], B_pool.shape[2])

    @torch.library.register_fake(f"{lib}::lora_delta_backward")
    def _(dy, x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats):
        return torch.empty_like(x), torch.empty_like(A_pool), torch.empty_like(B_pool)

    @torch.library.register_fake(f"{lib}::guidance_blend_")
    def _(out, noise, uncond_row, cond_row, style_rows, style_weights, cfg, rescale, stats):
        return None

    @torch.library.register_fake(f"{lib}::rank1_edit")
    def _(base, e, P, WU, G, O, beta, tau):
        return torch.empty_like(base, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{lib}::rank1_edit_backward")
    def _(dy, e, P, WU, G, O, beta, tau):
        c = torch.contiguous_format
        return tuple(torch.empty_like(t, memory_format=c) for t in (e, P, WU, G, O))

    _fakes_registered = True


# ----------------------------------------------------------------------------------------------
# Dispatch entries (backend "native"): the Python ops' implementations call the library
# ----------------------------------------------------------------------------------------------


def _ops():
    return getattr(torch.ops, NAMESPACE)


@dispatch.register("lora_apply", "native", dtypes=_NATIVE_DTYPES)
def _lora_apply_native(y, x, A_pool, B_pool, slots, scales, meta) -> None:
    _ops().lora_apply_(y, x, A_pool, B_pool, slots, scales, *meta)


@dispatch.register("lora_delta_backward", "native", dtypes=_NATIVE_DTYPES)
def _lora_delta_backward_native(dy, x, A_pool, B_pool, slots, scales, meta):
    return _ops().lora_delta_backward(dy, x, A_pool, B_pool, slots, scales, *meta)


@dispatch.register("guidance_blend", "native", dtypes=_NATIVE_DTYPES)
def _guidance_blend_native(out, noise, table) -> None:
    _ops().guidance_blend_(out, noise, *table)


@dispatch.register("rank1_edit", "native", dtypes=_NATIVE_DTYPES)
def _rank1_edit_native(base, e, P, WU, G, O, beta, tau):
    return _ops().rank1_edit(base, e, P, WU, G, O, beta, tau)


@dispatch.register("rank1_edit_backward", "native", dtypes=_NATIVE_DTYPES)
def _rank1_edit_backward_native(dy, e, P, WU, G, O, beta, tau):
    return _ops().rank1_edit_backward(dy, e, P, WU, G, O, beta, tau)
