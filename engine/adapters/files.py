"""The one file layer: every adapter file impasto reads is opened here.

Every family needs the same four things, and they must behave the same for all of them:

* a safetensors header (metadata, key -> shape and dtype) without reading tensor data
  (`read_header`, `WeightsFile`), tensors on demand, or a small file whole in one read
  (`read_safetensors`);
* pickles (``.bin``/``.ckpt``/``.pt``/``.pth``) only ever through
  ``torch.load(weights_only=True)`` (`load_weights_only`): a pickle that would run code is
  refused with AdapterFormatError and nothing in it executes;
* one table between safetensors' dtype names and torch dtypes (`SAFETENSORS_DTYPES`);
* checks at every open (`checked`): the path is a regular file (not a folder, FIFO or device,
  which would hang or mislead a reader), and, inside `confined(root)`, its real path lies under
  the adapter root. The store confines registration and loading, so a symlink inside a folder
  (a token file, a PEFT config) or a file swapped for a link after registration cannot reach
  outside the root.

Errors name the file: AdapterFormatError (missing, unreadable, not weights-only),
AdapterPathError (outside the root), AdapterValueError (a dtype impasto cannot read).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import pickle
import stat
import struct
from dataclasses import dataclass
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as _load_safetensors_bytes

from ..errors import AdapterFormatError, AdapterPathError, AdapterValueError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # torch dtype -> header name
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def safetensors_dtype(name: str, path: str, key: str) -> torch.dtype:
    """The torch dtype of safetensors dtype `name` ("F16", ...); AdapterValueError naming `key`."""
    dtype = SAFETENSORS_DTYPES.get(str(name).upper())
    if dtype is None:
        raise AdapterValueError(f"{path}: tensor {key!r} has dtype {name}, which impasto cannot read")
    return dtype


# ---------------------------------------------------------------------------------------------
# Checks at every open.
# ---------------------------------------------------------------------------------------------

_ROOT: contextvars.ContextVar[str | None] = contextvars.ContextVar("impasto_adapter_root", default=None)


@contextlib.contextmanager
def confined(root: str | None):
    """Within the block (this thread / context only), every open must resolve under `root`, a
    real path (os.path.realpath: resolved once by the caller, not at every load); None: no confinement."""
    token = _ROOT.set(root)
    try:
        yield
    finally:
        _ROOT.reset(token)


def check_root(path, root: str | None) -> None:
    """AdapterPathError unless `path`'s real path (symlinks and ../ resolved) is under `root`."""
    if root is None:
        return
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise AdapterPathError(f"{path}: resolves to {real}, outside adapter_root {root}")


# Limits on what a file may declare, checked before anything is materialized (docs/formats.md).
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors JSON header
MAX_TOKENS = 16  # placeholder tokens per adapter
MAX_EMBEDDING_VECTORS = 75  # learned embedding vectors per adapter (one CLIP context)
ALPHA_BOUND = 1e4  # |lora_alpha| <= ALPHA_BOUND * rank
_DIGEST_BYTES = 1 << 16  # a file's stamp digests its first 64 KiB (every header of a small adapter)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)

_STAMPS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("impasto_file_stamps", default=None)


@contextlib.contextmanager
def recording():
    """Within the block, every file opened through this layer is stamped: yields {real path:
    (size, mtime_ns, digest of its first 64 KiB)}, what `changed` compares later."""
    stamps: dict = {}
    token = _STAMPS.set(stamps)
    try:
        yield stamps
    finally:
        _STAMPS.reset(token)


def _stamp(fd: int, st) -> tuple:
    return st.st_size, st.st_mtime_ns, hashlib.sha256(os.pread(fd, _DIGEST_BYTES, 0)).hexdigest()


def changed(stamps: dict) -> str | None:
    """The first file of `stamps` (from `recording`) whose size, mtime or digest differ now (or
    that is gone or no regular file any more); None when none changed."""
    for path, stamp in stamps.items():
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            return path
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or _stamp(fd, st) != stamp:
                return path
        finally:
            os.close(fd)
    return None


@contextlib.contextmanager
def opened(path):
    """A binary file object of `path`, opened the one safe way: the real path (symlinks
    resolved) must lie under the confining root, it is opened with O_NOFOLLOW | O_NONBLOCK (a
    FIFO or device never blocks) and `fstat` of the open file must show a regular file. On
    Linux the opened file's own path (/proc/self/fd) must still be that real path, so a link
    swapped in between is caught too. AdapterPathError / AdapterFormatError naming `path`."""
    path = os.fspath(path)
    real = os.path.realpath(path)
    check_root(path, _ROOT.get())
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: no such file") from None
    except OSError as e:
        raise AdapterFormatError(f"{path}: cannot open: {e}") from e
    f = os.fdopen(fd, "rb")
    with f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdapterFormatError(f"{path}: not a regular file")
        proc = f"/proc/self/fd/{fd}"
        if os.path.islink(proc) and _ROOT.get() is not None:
            check_root(os.readlink(proc), _ROOT.get())
        os.set_blocking(fd, True)
        stamps = _STAMPS.get()
        if stamps is not None:
            stamps[real] = _stamp(fd, st)
        yield f


def fd_path(f) -> str:
    """A path that reopens exactly the file `f` (from `opened`) for readers that take a name."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else os.path.realpath(f.name) if isinstance(f.name, str) else f.name


def checked(path) -> str:
    """`path` as a str once it is known to be a regular file inside the confining root (opened
    and checked as `opened` does); readers that can, read through `opened` itself."""
    path = os.fspath(path)
    with opened(path):
        return path


# ---------------------------------------------------------------------------------------------
# safetensors.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """A safetensors header: metadata (str -> str), and per key its shape and dtype name ("F32")."""

    metadata: dict
    shapes: dict  # key -> tuple[int, ...]
    dtypes: dict  # key -> safetensors dtype name


def _parse_header(path: str, f) -> tuple[dict, dict]:
    """(metadata, {key: entry}) of the open safetensors file `f`, every field type-checked:
    the JSON must be an object, `__metadata__` an object of strings, each entry an object with a
    dtype string, a shape of non-negative ints and two data offsets within the file."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: {size} bytes, shorter than the header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, MAX_HEADER_BYTES):
        raise AdapterFormatError(f"{path}: not a readable safetensors file: header of {n} bytes "
                                 f"(file {size} bytes, limit {MAX_HEADER_BYTES})")
    try:
        header = json.loads(f.read(n))
    except RecursionError:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: header JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{path}: not a readable safetensors file: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: not a readable safetensors file: header is a JSON {type(header).__name__}, "
                                 "not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AdapterFormatError(f"{path}: header __metadata__ must be an object of strings")
    data = size - 8 - n
    for key, entry in header.items():
        ok = isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1] <= data:
            raise AdapterFormatError(f"{path}: header entry {key!r} is malformed or points outside the file: {entry!r:.200}")
        dtype = safetensors_dtype(entry["dtype"], path, key)
        if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
            raise AdapterFormatError(f"{path}: tensor {key!r} declares shape {shape} ({entry['dtype']}) but holds "
                                     f"{offsets[1] - offsets[0]} bytes")
    return metadata, header


def read_header(path) -> Header:
    """The header of a safetensors file, validated here (types, offsets, sizes) and by the
    safetensors library; no tensor data.

    Raises AdapterFormatError ("not a readable safetensors file") for a truncated or corrupt file.
    """
    path = os.fspath(path)
    with opened(path) as fh:
        metadata, _ = _parse_header(path, fh)
        try:
            with safe_open(fd_path(fh), framework="pt", device="cpu") as f:
                shapes, dtypes = {}, {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    shapes[key] = tuple(sl.get_shape())
                    dtypes[key] = sl.get_dtype()
                return Header(metadata, shapes, dtypes)
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{path}: not a readable safetensors file: {e}") from e


def header_metadata(path) -> dict:
    """The header's __metadata__, or {} when `path` is no readable safetensors file: for
    detection, which must not fail where the family's reader reports the problem better."""
    try:
        return read_header(path).metadata
    except (AdapterFormatError, AdapterPathError, AdapterValueError):
        return {}


def read_safetensors(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and every tensor from one read of a small file (a rank1 adapter, C⁻¹).

    For ~100 KB of small vectors, `safetensors.torch.load` on the bytes costs a third of
    `safe_open` + `get_tensor` per key (the per-key call overhead dominates).
    """
    path = os.fspath(path)
    with opened(path) as f:
        metadata, _ = _parse_header(path, f)
        f.seek(0)
        data = f.read()
    try:
        tensors = _load_safetensors_bytes(data)  # validates the header, offsets and sizes
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    return metadata, tensors


def looks_like_safetensors(path) -> bool:
    """Content sniff: an 8-byte little-endian header length, then a JSON object that fits.
    Tools name safetensors files .bin (diffusers' Custom Diffusion script does): content decides."""
    try:
        with opened(path) as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except (OSError, AdapterFormatError):
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 8 + n <= size


# ---------------------------------------------------------------------------------------------
# Pickles.
# ---------------------------------------------------------------------------------------------

_UNPICKLE_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, OSError,
                    KeyError, IndexError, ImportError)


def load_weights_only(path):
    """The object pickled at `path`, loaded with torch's weights-only unpickler: tensors, dicts,
    lists and numbers only; anything that would run code is refused and never executed."""
    path = os.fspath(path)
    with opened(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except _UNPICKLE_ERRORS as e:
            raise AdapterFormatError(f"{path}: not a weights-only torch file (refused, nothing executed): "
                                     f"{_unpickle_reason(e)}") from None
    _check_declared(path, obj, size)
    return obj


def _unpickle_reason(e: Exception) -> str:
    """torch's refusal without its advice to retry with weights_only=False (never for adapters)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and "weights_only" not in ln]
    return " ".join(lines[:2])[:300] or type(e).__name__


def _check_declared(path: str, obj, size: int) -> None:
    """AdapterFormatError when a pickle's tensors declare more bytes than the file holds: a
    stride-0 (`expand`) or overlapping view claims far more elements than its storage has, which
    every later `.contiguous()` or `.to()` would allocate."""
    declared = 0
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            nbytes = x.numel() * x.element_size()
            if nbytes > x.untyped_storage().nbytes():
                raise AdapterFormatError(
                    f"{path}: a tensor of shape {list(x.shape)} declares {nbytes} bytes but its storage holds "
                    f"{x.untyped_storage().nbytes()} (a stride-0 or overlapping view)")
            declared += nbytes
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    if declared > size:
        raise AdapterFormatError(f"{path}: its tensors declare {declared} bytes, more than the file's {size}")


# ---------------------------------------------------------------------------------------------
# One weights file, either kind.
# ---------------------------------------------------------------------------------------------


class WeightsFile:
    """Keys, shapes, dtypes and tensors of one weights file, safetensors or pickle.

    safetensors: only the header is read here; `tensors` reads data on demand. A pickle has no
    header, so it is loaded whole. nested=False: the pickle must be a flat {name: tensor} dict
    (LoRA). nested=True: nested dicts are flattened with "/" ("unet/<key>"), empty dicts are
    listed in `empty` and non-tensor leaves in `others` for the family to judge (Custom Diffusion).
    """

    def __init__(self, path, *, nested: bool = False):
        self.path = checked(path)
        self.is_safetensors = not self.path.endswith(PICKLE_SUFFIXES) or looks_like_safetensors(self.path)
        self.metadata: dict[str, str] = {}
        self.empty: list[str] = []
        self.others: dict[str, object] = {}
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.is_safetensors:
            header = read_header(self.path)
            self.metadata = header.metadata
            self._shapes = header.shapes
            self._dtypes = {k: safetensors_dtype(d, self.path, k) for k, d in header.dtypes.items()}
            return
        obj = load_weights_only(self.path)
        if nested:
            self._tensors = {}
            self._flatten(obj, "")
        elif isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            self._tensors = obj
        else:
            raise AdapterFormatError(f"{self.path}: a pickled weights file must hold a flat dict of name -> tensor, "
                                     f"got {type(obj).__name__}")
        self._shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        self._dtypes = {k: v.dtype for k, v in self._tensors.items()}

    def _flatten(self, obj, prefix: str) -> None:
        if isinstance(obj, torch.Tensor):
            self._tensors[prefix] = obj
        elif isinstance(obj, dict):
            if not obj and prefix:
                self.empty.append(prefix)
            for k, v in obj.items():
                if not isinstance(k, str):
                    raise AdapterFormatError(f"{self.path}: key {k!r} under {prefix or 'the top level'!r} is not a string")
                self._flatten(v, f"{prefix}/{k}" if prefix else k)
        else:
            self.others[prefix] = obj

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def nbytes(self, key: str) -> int:
        return math.prod(self._shapes[key]) * self._dtypes[key].itemsize

    def tensors(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """{key: tensor} as stored (CPU); safetensors data is read now."""
        keys = list(keys)
        if self._tensors is not None:
            return {k: self._tensors[k] for k in keys}
        try:
            with opened(self.path) as fh, safe_open(fd_path(fh), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFormatError(f"{self.path}: cannot read tensor data (truncated or corrupt file?): {e}") from e
