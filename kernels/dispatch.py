"""One dispatch table for every kernel family: which backend runs an op, and why not another.

Backends:
    reference  plain PyTorch; the ground truth of every test and the CPU path.
    triton     Triton kernels; on CUDA, or on CPU tensors under the Triton interpreter
               (TRITON_INTERPRET=1, which tests use).
    native     the compiled extension (csrc/ + bindings/, loaded by kernels/native.py): CPU
               kernels, and CUDA kernels where it was built with a CUDA toolkit.

Choice, first match wins:
    1. the op's `backend=` argument,
    2. the innermost `use_backend(...)` context manager of the current context (a contextvar:
       per thread and per asyncio task),
    3. the environment variable IMPASTO_BACKEND (read at every call, so tests can set it),
    4. the device default, chosen once per device type: `triton` on CUDA when it can run there,
       otherwise `reference`; on CPU, `native` for the ops in NATIVE_CPU_DEFAULT (those the
       benchmark showed faster than the reference) when the extension is loaded.

A backend that cannot run an op raises `BackendNotSupportedError` listing every backend's
reasons, after xformers' `not_supported_reasons` (xformers/ops/fmha/dispatch.py).

Families register implementations with `@register("lora_apply", "triton")`; an op with no
implementation on a backend is rejected with that as its reason.
"""

import contextlib
import contextvars
import enum
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator

import torch

ENV_VAR = "IMPASTO_BACKEND"


class Backend(str, enum.Enum):
    REFERENCE = "reference"
    TRITON = "triton"
    NATIVE = "native"


class BackendNotSupportedError(RuntimeError):
    """The requested (or every) backend cannot run this op on these inputs."""


# op name -> backend -> implementation
_REGISTRY: dict[str, dict[Backend, Callable]] = {}
# op name -> backend -> dtypes the implementation accepts (None: any)
_DTYPES: dict[str, dict[Backend, frozenset | None]] = {}
# innermost last; set by use_backend. Context-local, so one thread's (or asyncio task's) override
# never reaches another's ops; the engine captures it with copy_context() at submit.
_OVERRIDES: contextvars.ContextVar[tuple[Backend, ...]] = contextvars.ContextVar("impasto_backend", default=())


def register(op: str, backend: str, dtypes=None) -> Callable:
    """Decorator: `fn` implements `op` on `backend`, for `dtypes` (an iterable, or None for any)."""
    name = Backend(backend)

    def wrap(fn):
        _REGISTRY.setdefault(op, {})[name] = fn
        _DTYPES.setdefault(op, {})[name] = None if dtypes is None else frozenset(dtypes)
        return fn

    return wrap


def _parse(backend) -> Backend:
    if isinstance(backend, Backend):  # the hot path passes members; Enum lookup costs ~1 us
        return backend
    try:
        return Backend(backend)
    except ValueError:
        names = ", ".join(b.value for b in Backend)
        raise BackendNotSupportedError(f"unknown backend {backend!r}; known backends: {names}") from None


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


# Ops whose native CPU kernel beat the reference in benchmarks/bench_native.py (RESULTS.md,
# "Native CPU kernels"); the CPU default for them when the extension is loaded.
# guidance_blend: 1.3-2.2x the reference; lora_apply (0.2-0.8x: the reference's BLAS wins) and
# rank1_edit (0.7x fp32, 1.1-1.5x bf16) stay on the reference.
NATIVE_CPU_DEFAULT: frozenset[str] = frozenset({"guidance_blend"})


def platform_reasons(backend, device_type: str) -> list[str]:
    """Why `backend` cannot run on `device_type` at all (empty list: it can)."""
    backend = _parse(backend)
    reasons = []
    if backend is Backend.REFERENCE:
        return reasons
    if backend is Backend.TRITON:
        if not _triton_importable():
            reasons.append("triton is not installed")
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("triton runs CPU tensors only under the interpreter (TRITON_INTERPRET=1)")
        elif device_type == "cuda" and not torch.cuda.is_available():
            reasons.append("torch has no CUDA device")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"triton does not run on device type {device_type!r}")
    elif backend is Backend.NATIVE:
        from . import native  # imports dispatch itself; loaded by impasto.kernels

        reasons += native.reasons(device_type)
    return reasons


def not_supported_reasons(op: str, backend, device_type: str, dtype: torch.dtype | None = None) -> list[str]:
    """Why `backend` cannot run `op` on `device_type` with `dtype` (empty list: it can)."""
    backend = _parse(backend)
    reasons = platform_reasons(backend, device_type)
    impls = _REGISTRY.get(op, {})
    if backend not in impls:
        reasons.append(f"no {backend.value} implementation of {op!r} is registered")
    else:
        dtypes = _DTYPES[op][backend]
        if dtype is not None and dtypes is not None and dtype not in dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            reasons.append(f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {names})")
    return reasons


@functools.cache
def default_backend(device_type: str) -> Backend:
    """The backend chosen once per device type when nothing overrides it."""
    if device_type == "cuda" and not platform_reasons(Backend.TRITON, "cuda"):
        return Backend.TRITON
    return Backend.REFERENCE


def requested_backend(backend=None) -> Backend | None:
    """The override in force: the argument, else the innermost context manager, else the env var."""
    if backend is not None:
        return _parse(backend)
    overrides = _OVERRIDES.get()
    if overrides:
        return overrides[-1]
    env = os.environ.get(ENV_VAR, "")
    if env:
        return _parse(env)
    return None


def select(op: str, device: torch.device | str, dtype: torch.dtype | None = None, backend=None) -> Backend:
    """Resolve the backend for one call, or raise with every backend's reasons."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    chosen = requested_backend(backend)
    if chosen is None:
        chosen = default_backend(device_type)
        if device_type == "cpu" and op in NATIVE_CPU_DEFAULT and not not_supported_reasons(op, Backend.NATIVE, "cpu", dtype):
            chosen = Backend.NATIVE
    if not not_supported_reasons(op, chosen, device_type, dtype):
        return chosen
    lines = [f"backend {chosen.value!r} cannot run {op!r} on {device_type} with dtype {dtype}:"]
    for name in Backend:
        reasons = not_supported_reasons(op, name, device_type, dtype)
        lines.append(f"  {name.value}: " + ("supported" if not reasons else "; ".join(reasons)))
    raise BackendNotSupportedError("\n".join(lines))


def implementation(op: str, backend) -> Callable:
    """The function registered for `op` on `backend`."""
    return _REGISTRY[op][_parse(backend)]


def resolve(op: str, device: torch.device | str, dtype: torch.dtype | None = None, backend=None) -> Callable:
    """The implementation that runs `op` for one call: `implementation(op, select(...))`.
    `backend` "" or None defers to the context, the environment and the device default."""
    return _REGISTRY[op][select(op, device, dtype, backend or None)]


@contextlib.contextmanager
def use_backend(backend) -> Iterator[Backend]:
    """Run the ops inside the block on `backend` unless a call passes its own `backend=`."""
    name = _parse(backend)
    token = _OVERRIDES.set(_OVERRIDES.get() + (name,))
    try:
        yield name
    finally:
        _OVERRIDES.reset(token)


def context_backend() -> Backend | None:
    """The innermost `use_backend` override of the current context (not the env var), or None."""
    overrides = _OVERRIDES.get()
    return overrides[-1] if overrides else None
