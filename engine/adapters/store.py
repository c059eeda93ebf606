"""The adapter store: registered adapters by name (headers only), loaded on demand.

Tiers: disk (the file as registered) -> host cache (fully read, validated files, LRU,
`host_cache_bytes`) -> device slot pools (`LoraRuntime`, fixed slots per rank bucket).
Everything family-specific (detection, reading, request rules, per-row LoRA entries) is the
family's (adapters/families/); the store looks families up in the registry and never names one,
except in the kv and rank1 tools it offers (compress_kv, merge_kv, covariance).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict

import torch

from ..api import ADAPTER_NAME, Adapter, AdapterInfo
from ..errors import AdapterError, AdapterFormatError, AdapterNameError, AdapterNotFoundError, RequestError
from . import files
from . import kv as kv_format
from . import rank1 as rank1_format
from .families import FAMILIES, Family, detect_family, get_family
from .families.kv import kv_base
from .lora import lora_targets

# The lora-like family names, computed at import: families registered later are not in it, so
# new code asks `store.family(name).lora_like`. Kept for the engine until it does.
LORA_LIKE = tuple(name for name, family in FAMILIES.items() if family.lora_like)

__all__ = ["AdapterStore", "FAMILIES", "LORA_LIKE", "detect_family"]


class AdapterStore:
    """Adapters known to one engine: `register(name, path)` reads and validates the header;
    weights are read when a request first needs them."""

    def __init__(
        self,
        unet,
        *,
        text_encoder=None,
        root=None,
        host_cache_bytes=None,
        device_pool_bytes=None,
        max_rank=64,
        dtype=None,
        model_dir=None,
        targets=None,
    ):
        """targets: the LoRA modules this engine serves ({module: (in, out)}); None: every Linear
        and 1x1 conv of the UNet. Files naming a module outside it are refused at registration."""
        self.unet = unet
        self.root = os.path.realpath(root) if root else None
        self.host_cache_bytes = host_cache_bytes
        self.device_pool_bytes = device_pool_bytes
        self.max_rank = max_rank
        self.dtype = dtype
        self.all_targets = lora_targets(unet)
        self.targets = self.all_targets if targets is None else targets
        self.te_targets = lora_targets(text_encoder) if text_encoder is not None else {}
        self.text_encoder = text_encoder  # embeddings check their width against its input embeddings
        self.tokenizer = None  # set by the engine: embedding tokens may not be words of its vocabulary
        self._infos: dict[str, AdapterInfo] = {}
        self._host: OrderedDict = OrderedDict()  # name -> (loaded file, nbytes), LRU order
        self._lock = threading.RLock()
        self._base_values: dict = {}  # base_value's cache
        self._pins: dict[str, int] = {}
        self._stamps: dict[str, tuple] = {}  # name -> ({file: (size, mtime_ns, digest)}, suffix, token) at registration
        self.boundary = contextlib.nullcontext()  # the engine's step-boundary lock: (un)register between steps
        self.runtimes = ()  # the LoraRuntimes holding device slot pools (UNet, text encoder), set by the engine
        self._C_inv = None
        self.model_dir = model_dir
        self._cache_counts = {"hits": 0, "misses": 0, "loads": 0, "load_seconds": 0.0}  # see stats()

    # ------------------------------------------------------------------ registry
    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        return sorted(self._infos)

    def info(self, name: str) -> AdapterInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise AdapterNameError(f"unknown adapter {name!r}: not registered") from None

    def register(self, name: str, path, *, family=None, suffix=None, token=None, image_encoder=None) -> AdapterInfo:
        """Register the adapter file (or tool-written folder) at `path` under `name`.

        Reads only the header, detects the format and validates every tensor's shape against the
        base model. Raises an AdapterError subclass naming the file and what is wrong.
        image_encoder: an encoder adapter's CLIPVisionModelWithProjection folder (default: the
        base model folder's image_encoder/).
        """
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise AdapterNameError(f"adapter name {name!r} must match [A-Za-z0-9._-]+")
        path = self._check_path(path)
        info, stamps = self._read_info(name, path, family, suffix, token, image_encoder)
        with self.boundary, self._lock:
            if name in self._infos:
                raise AdapterNameError(f"adapter name {name!r} is already registered (to {self._infos[name].path})")
            self._infos[name] = info
            self._stamps[name] = (stamps, suffix, token)
        return info

    def _read_info(self, name, path, family, suffix, token, image_encoder=None):
        """(AdapterInfo, {file: stamp} of every file read) from the family's header reader,
        every open confined to the root; errors name the adapter."""
        try:
            with files.confined(self.root), files.recording() as stamps:  # every open stays inside the root
                fam = get_family(family or detect_family(path), path)
                extra = {}
                if image_encoder is not None:  # only families that read images take an encoder
                    if not fam.image_input:
                        raise AdapterFormatError(f"{path}: image_encoder= is for encoder adapters, this is a "
                                                 f"{fam.name} adapter")
                    extra["image_encoder"] = image_encoder
                info = fam.register(self, name, path, suffix=suffix, token=token, **extra)
        except AdapterError as e:
            raise _naming(e, name) from e.__cause__
        return info, stamps

    def family(self, name: str) -> Family:
        """The family of the registered adapter `name` (AdapterNameError when unknown)."""
        info = self.info(name)
        return get_family(info.family, info.path)

    def base_value(self, key: str, make):
        """A value derived from the frozen base model, made once per store by `make()`: families
        keep what every header check or read needs here (attn2 shapes, K/V weights, module names)."""
        with self._lock:
            if key not in self._base_values:
                self._base_values[key] = make()
            return self._base_values[key]

    def compress_kv(self, name: str, out_path, *, rank=None, energy=0.6) -> dict:
        """SVD-compress the Custom Diffusion adapter `name` into impasto's `kv` file at `out_path`.

        rank=None: per matrix, the paper's energy rule (singular values up to the first index
        whose cumulative share exceeds `energy`, that index excluded); else a fixed rank.
        Returns {"path", "bytes", "ranks": {attn2 layer: (r_k, r_v)}, "notes"}.
        """
        info = self.info(name)
        if info.family != "kv":
            raise AdapterFormatError(f"compress_kv: {name!r} is a {info.family} adapter, not kv")
        compressed, ranks = kv_format.compress_kv_delta(self.load(name), rank=rank, energy=energy)
        nbytes = kv_format.write_kv(out_path, compressed)
        return {"path": str(out_path), "bytes": nbytes, "ranks": ranks, "notes": compressed.notes}

    def merge_kv(self, names, captions, *, name: str, categories, tokenizer, text_encoder, out_path) -> AdapterInfo:
        """Merge Custom Diffusion adapters in closed form (Custom Diffusion §3.2) into one `kv`
        file at `out_path` (full rank, so nothing is lost) and register it as `name`; the
        tokens become <new1>, <new2>, ... in the order of `names`."""
        kvfiles = [self.load(n) for n in names]
        for n in names:
            if self.info(n).family != "kv":
                raise AdapterFormatError(f"merge_kv: {n!r} is a {self.info(n).family} adapter, not kv")
        merged = kv_format.merge_kv(
            kvfiles, list(captions), categories=list(categories), tokenizer=tokenizer, text_encoder=text_encoder,
            base=kv_base(self),
        )
        full = max(min(layer.delta_k().shape) for layer in merged.layers.values())
        compressed, _ = kv_format.compress_kv_delta(merged, rank=full)
        kv_format.write_kv(out_path, compressed)
        return self.register(name, out_path, family="kv")

    def covariance_root(self) -> str:
        """Where engine state (C⁻¹ per base model) lives: adapter_root, else the user cache."""
        return self.root or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "impasto"
        )

    def covariance(self) -> torch.Tensor:
        """C⁻¹ of this base model's text encodings (Perfusion), keyed by the base fingerprint:
        from the covariance root, else shipped beside the model (`perfusion_covariance.safetensors`)."""
        if self._C_inv is None:
            path = rank1_format.covariance_path(self.covariance_root(), self.fingerprint)
            shipped = os.path.join(self.model_dir or "", "perfusion_covariance.safetensors")
            if not path.is_file() and self.model_dir and os.path.isfile(shipped):
                self._C_inv = files.read_safetensors(shipped)[1]["C_inv"].float()
            else:
                self._C_inv = rank1_format.load_covariance(self.covariance_root(), self.fingerprint)
        return self._C_inv

    def compute_covariance(self, tokenizer, text_encoder, captions) -> str:
        """Compute C⁻¹ over `captions` and store it under the covariance root; returns the path."""
        C = rank1_format.compute_covariance(tokenizer, text_encoder, list(captions))
        C_inv = rank1_format.inverse_covariance(C)
        path = rank1_format.save_covariance(
            self.covariance_root(), self.fingerprint, C_inv, num_captions=len(captions), model_dir=self.model_dir
        )
        self._C_inv = None
        return str(path)

    @property
    def fingerprint(self) -> str:
        """The base model's identity (rank1 files and C⁻¹ are keyed by it)."""
        return self.base_value("fingerprint", lambda: rank1_format.fingerprint(self.unet))

    def register_dir(self, folder) -> dict:
        """Register every adapter in `folder`: one per file (.safetensors, .bin, .ckpt) or per
        subfolder a tool wrote (a Custom Diffusion or PEFT output folder), named by its stem.
        Returns {path: AdapterError} for the ones refused; the others are registered."""
        errors = {}
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.startswith("."):
                continue
            if os.path.isdir(path):
                name = entry
            elif entry.endswith((".safetensors", ".bin", ".ckpt")):
                name = os.path.splitext(entry)[0]
            else:
                continue
            try:
                self.register(name, path)
            except AdapterError as e:
                errors[path] = e
            except Exception as e:  # one hostile file never stops the others from registering
                errors[path] = AdapterFormatError(f"{path}: adapter {name!r} cannot be read: {type(e).__name__}: {e}")
        return errors

    def unregister(self, name: str) -> None:
        """Forget `name`. An adapter a running request uses cannot be unregistered."""
        with self.boundary, self._lock:
            self.info(name)
            if self._pins.get(name):
                raise AdapterError(f"adapter {name!r} is in use by a running request; unregister it after the batch")
            del self._infos[name]
            self._stamps.pop(name, None)
            self._host.pop(name, None)

    @contextlib.contextmanager
    def pinned(self, names):
        """Keep `names` resident in the host cache while a batch uses them."""
        names = list(names)
        with self._lock:
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                for n in names:
                    self._pins[n] -= 1
                    if not self._pins[n]:
                        del self._pins[n]
                self._shrink_host()

    def resident_bytes(self) -> dict:
        """Bytes of adapter weights resident per tier: host cache (the distinct tensor storages it
        holds, at the dtype held) and device pools."""
        with self._lock:
            return {"host": held_bytes(obj for obj, _ in self._host.values()), "device": self.device_bytes()}

    def device_bytes(self) -> int:
        return sum(r.nbytes() for r in self.runtimes)

    def _check_path(self, path) -> str:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise AdapterNotFoundError(f"{path}: no such file or folder")
        files.check_root(path, self.root)
        return path

    # ------------------------------------------------------------------ requests
    def resolve(self, adapters: list[Adapter]) -> list[Adapter]:
        """Check that every adapter a request names is registered, once, and named as its
        family allows (`check_use`)."""
        seen = set()
        for a in adapters:
            if not ADAPTER_NAME.match(a.name):
                raise RequestError(f"adapter name {a.name!r} must match [A-Za-z0-9._-]+")
            if a.name in seen:
                raise RequestError(f"adapters: {a.name!r} is named twice")
            seen.add(a.name)
            self.check_use(a)
        return adapters

    def implicit(self, texts, named) -> list[Adapter]:
        """The adapters of `implicit` families (embeddings) that `texts` mention and that are not
        in `named`, each at scale 1: a request uses them without naming them."""
        with self._lock:
            infos = [i for i in self._infos.values() if i.name not in named]
        return [Adapter(i.name) for i in infos
                if (f := FAMILIES.get(i.family)) is not None and f.implicit and f.mentioned(i, texts)]

    def check_use(self, adapter: Adapter) -> None:
        """Raise RequestError / AdapterNameError when a request may not name `adapter` as it
        does: its family's rules (scale, options), and that it is registered."""
        self.family(adapter.name).check_use(adapter, self.info(adapter.name))

    def lora_rows(self, adapters: tuple, files: dict) -> list[tuple[str, float]]:
        """Semantics: one branch row's entries in the per-row UNet LoRA tables,
        [e for (name, scale, options) in adapters for e in family(name).lora_rows(name, scale, files[name])].

        adapters: the branch's ((name, scale, options), ...); files: name -> loaded file.
        """
        return [e for name, scale, _ in adapters for e in self.family(name).lora_rows(name, scale, files[name])]

    def stats(self) -> dict:
        """Host-cache counters since construction: hits, misses, loads (files read and validated)
        and load_seconds (time spent reading them), for a server's /metrics."""
        with self._lock:
            return dict(self._cache_counts)

    def load(self, name: str):
        """The fully read, validated weights of `name`, through the host cache.

        A file whose size, mtime or header digest changed since registration is validated
        again in full against the base (as at registration); if it no longer fits, the
        AdapterError names the file and only the request loading it fails."""
        with self._lock:
            if name in self._host:
                self._host.move_to_end(name)
                self._cache_counts["hits"] += 1
                return self._host[name][0]
            info = self.info(name)
            self._cache_counts["misses"] += 1
            stamps, suffix, token = self._stamps.get(name, ({}, info.suffix, None))
        gone = files.changed(stamps)
        if gone is not None:
            info = self._revalidate(name, info, gone, suffix, token)
        with self._lock:
            self._shrink_host(reserve=info.nbytes)  # room for the declared bytes before they are read
        t_load = time.perf_counter()
        try:
            with files.confined(self.root):
                obj = self.family(name).load(self, info)
        except AdapterError as e:
            raise _naming(e, name) from e.__cause__
        with self._lock:
            self._cache_counts["loads"] += 1
            self._cache_counts["load_seconds"] += time.perf_counter() - t_load
            self._host[name] = (obj, held_bytes([obj]))
            self._shrink_host()
        return obj

    def _revalidate(self, name, info, path, suffix, token):
        """The AdapterInfo of `name` read again from its changed files (AdapterError naming `path` if they no longer fit)."""
        try:
            new, stamps = self._read_info(name, info.path, info.family, suffix, token, info.image_encoder)
        except AdapterError as e:
            raise type(e)(f"{path}: changed since adapter {name!r} was registered and no longer fits: {e}") from None
        if new.token_map != info.token_map:
            raise AdapterNameError(f"{path}: changed since adapter {name!r} was registered: its tokens are now "
                                   f"{[t for t, _ in new.token_map]}, the requests use {[t for t, _ in info.token_map]}")
        with self._lock:
            if self._infos.get(name) is info:
                self._infos[name] = new
                self._stamps[name] = (stamps, suffix, token)
        return new

    def _shrink_host(self, reserve: int = 0) -> None:
        """Evict least-recently-used adapters until what is held plus `reserve` bytes fits the
        budget; never one a running batch uses."""
        if self.host_cache_bytes is None:
            return
        total = sum(n for _, n in self._host.values()) + reserve
        for name in list(self._host):
            if total <= self.host_cache_bytes:
                break
            if self._pins.get(name):
                continue
            total -= self._host.pop(name)[1]



def _naming(e: AdapterError, name: str) -> AdapterError:
    """`e` with a message that names the adapter too (the file is named by the reader)."""
    if repr(name) in str(e):
        return e
    return type(e)(f"adapter {name!r}: {e}")


def held_bytes(objs) -> int:
    """Bytes of the distinct tensor storages reachable from `objs` (loaded adapter files:
    dataclasses, dicts, lists, tuples of tensors), each storage counted once at its held size."""
    seen, total = set(), 0
    stack, visited = list(objs), set()
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), x.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(x, (str, bytes, int, float, bool, type(None))):
            continue
        elif id(x) in visited:
            continue
        else:
            visited.add(id(x))
            if isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple, set, frozenset)):
                stack.extend(x)
            elif hasattr(x, "__dict__"):
                stack.extend(vars(x).values())
    return total
