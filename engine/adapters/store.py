"""The adapter store: registered adapters by name (headers only), loaded on demand.

Tiers: disk (the file as registered) -> host cache (fully read, validated LoraFile objects,
LRU, `host_cache_bytes`) -> device slot pools (`LoraRuntime`, fixed slots per rank bucket).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch
from collections import OrderedDict

import json

from ..api import ADAPTER_NAME, Adapter, AdapterInfo
from ..errors import (
    AdapterValueError,
    AdapterError,
    AdapterFormatError,
    AdapterNameError,
    AdapterNotFoundError,
    AdapterPathError,
    AdapterShapeError,
    RequestError,
)
from . import kv as kv_format
from . import rank1 as rank1_format
from .lora import lora_targets, validate_lora_header
from . import lora_formats
from .lora_formats import read_lora, read_lora_header

FAMILIES = ("lora", "style", "rank1", "kv")
LORA_LIKE = ("lora", "style")


class TextEncoderLora:
    """A LoRA file's text-encoder layers ({module: LoraLayer}), applied by the plan."""

    def __init__(self, layers: dict):
        self.layers = layers


def detect_family(path: str) -> str:
    """The family a file or tool-written folder holds, from names and the safetensors header."""
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if any(n.startswith("pytorch_custom_diffusion_weights") for n in names):
            return "kv"
        return "lora"
    if path.endswith(".safetensors"):
        meta = _safetensors_metadata(path)
        family = meta.get("impasto.family")
        if family:
            return family
        if meta.get("impasto.style_suffix"):
            return "style"
        return "lora"
    base = os.path.basename(path)
    if base.startswith(("delta", "compressed_delta", "pytorch_custom_diffusion_weights")):
        return "kv"
    return "lora"


def _safetensors_metadata(path: str) -> dict:
    """The header's __metadata__ without reading tensors; {} when unreadable (the reader reports)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000 or n > os.path.getsize(path) - 8:
                return {}
            return json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError):
        return {}


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
        self._module_names = set(dict(unet.named_modules()))
        self._infos: dict[str, AdapterInfo] = {}
        self._host: OrderedDict = OrderedDict()  # name -> (LoraFile, nbytes), LRU order
        self._lock = threading.RLock()
        self._fingerprint = None
        self._shapes_cache = None
        self._kv_cache = None
        self._pins: dict[str, int] = {}
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

    def register(self, name: str, path, *, family=None, suffix=None, token=None) -> AdapterInfo:
        """Register the adapter file (or tool-written folder) at `path` under `name`.

        Reads only the header, detects the format and validates every tensor's shape against the
        base model. Raises an AdapterError subclass naming the file and what is wrong.
        """
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise AdapterNameError(f"adapter name {name!r} must match [A-Za-z0-9._-]+")
        path = self._check_path(path)
        detected = detect_family(path)
        family = family or detected
        if family not in FAMILIES:
            raise AdapterFormatError(f"{path}: unknown adapter family {family!r} (known: {', '.join(FAMILIES)})")
        if family == "style" and detected not in LORA_LIKE:
            raise AdapterFormatError(f"{path}: a style adapter must be a LoRA file, this one holds {detected!r}")
        if family in LORA_LIKE:
            info = self._register_lora(name, path, family, suffix, token)
        elif family == "rank1":
            info = self._register_rank1(name, path, suffix, token)
        elif family == "kv":
            info = self._register_kv(name, path, suffix, token)
        with self.boundary, self._lock:
            if name in self._infos:
                raise AdapterNameError(f"adapter name {name!r} is already registered (to {self._infos[name].path})")
            self._infos[name] = info
        return info

    def _register_lora(self, name, path, family, suffix, token) -> AdapterInfo:
        header = read_lora_header(path, self._module_names)
        validate_lora_header(header, self.targets, self.max_rank, self.all_targets)
        if header.text_encoder_keys:
            self._text_encoder_entries(header.path, header.text_encoder_keys, header.metadata)
        if family == "style" and suffix is None:
            suffix = header.metadata.get("impasto.style_suffix")
        return AdapterInfo(
            name=name,
            path=path,
            family=family,
            format=header.format,
            rank=max((layer.rank for layer in header.layers.values()), default=0),
            targets=tuple(sorted(header.layers)),
            nbytes=header.nbytes,
            token=token,
            suffix=suffix,
        )

    def _text_encoder_entries(self, path, keys, metadata) -> dict:
        """{text-encoder module: (down key, up key, scale)}, checked against the text encoder."""
        src = lora_formats._Source(path)
        alpha_keys = [k for k in keys if k.endswith(".alpha")]
        alphas = {k: float(v) for k, v in src.tensors(alpha_keys).items()} if alpha_keys else {}
        entries = lora_formats.text_encoder_lora_layers(
            path, {k: src.shape(k) for k in keys}, metadata, self.te_targets, alphas
        )
        for module, (down, up, _) in entries.items():
            k, n = self.te_targets[module]
            if (src.shape(down)[1], src.shape(up)[0]) != (k, n):
                raise AdapterShapeError(f"{path}: text-encoder module {module!r} is {k}->{n}, the adapter has "
                                        f"{src.shape(down)[1]}->{src.shape(up)[0]}")
            if src.shape(down)[0] > self.max_rank:
                raise AdapterValueError(f"{path}: text-encoder module {module!r} has rank {src.shape(down)[0]}, "
                                        f"above max_rank={self.max_rank}")
        return entries

    def _register_rank1(self, name, path, suffix, token) -> AdapterInfo:
        header = rank1_format.read_rank1_header(path)
        if header.fingerprint != self.fingerprint:
            raise AdapterShapeError(
                f"{path}: made for another base model (fingerprint {header.fingerprint}, this base is {self.fingerprint})"
            )
        shapes = self._rank1_shapes()
        layers = {k[: -len(rank1_format.SUFFIX_K)] for k in header.shapes if k.endswith(rank1_format.SUFFIX_K)}
        if layers != set(shapes):
            missing = sorted(set(shapes) - layers) or sorted(layers - set(shapes))
            raise AdapterShapeError(f"{path}: attn2 layers differ from this base model's (e.g. {missing[0]!r})")
        for layer, (k_shape, v_shape) in shapes.items():
            got = (header.shapes[layer + rank1_format.SUFFIX_K], header.shapes[layer + rank1_format.SUFFIX_V])
            if got != ((k_shape[0],), (v_shape[0],)):
                raise AdapterShapeError(f"{path}: layer {layer!r} has o* lengths {got}, this base needs {k_shape[0]}, {v_shape[0]}")
        width = {k[1] for k, _ in shapes.values()}  # the text width every attn2 K/V reads
        if (header.shapes[rank1_format.KEY_I_STAR][0],) != tuple(width) or len(width) != 1:
            raise AdapterShapeError(f"{path}: i_star has shape {header.shapes[rank1_format.KEY_I_STAR]}, this base needs {tuple(width)}")
        return AdapterInfo(
            name=name,
            path=path,
            family="rank1",
            format="impasto-rank1",
            rank=1,
            targets=tuple(shapes),
            nbytes=sum(4 * s[0] for s in header.shapes.values()),
            token=token or header.placeholder,
            suffix=suffix,
            fingerprint=header.fingerprint,
            token_map=((token or header.placeholder, header.placeholder),),
        )

    def _register_kv(self, name, path, suffix, token) -> AdapterInfo:
        header = kv_format.read_kv_header(path, self._kv_base())
        placeholders = list(header.placeholders)
        if token is not None and len(placeholders) != 1:
            raise AdapterNameError(f"{path}: token= renames one placeholder, the file defines {placeholders}")
        token_map = ((token, placeholders[0]),) if token is not None else tuple((p, p) for p in placeholders)
        return AdapterInfo(
            name=name,
            path=path,
            family="kv",
            format=header.format,
            rank=header.rank or 0,
            targets=tuple(header.layers),
            nbytes=header.nbytes,
            token=token_map[0][0] if token_map else None,
            suffix=suffix,
            token_map=token_map,
        )

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
        files = [self.load(n) for n in names]
        for n in names:
            if self.info(n).family != "kv":
                raise AdapterFormatError(f"merge_kv: {n!r} is a {self.info(n).family} adapter, not kv")
        merged = kv_format.merge_kv(
            files, list(captions), categories=list(categories), tokenizer=tokenizer, text_encoder=text_encoder,
            base=self._kv_base(),
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
                from safetensors.torch import load_file

                self._C_inv = load_file(shipped)["C_inv"].float()
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

    def _text_encoder_lora(self, lora):
        """The file's text-encoder LoRA as {module: LoraLayer} (None without one), values checked."""
        if not lora.text_encoder_layers:
            return None
        tensors = lora.text_encoder_layers
        alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        entries = lora_formats.text_encoder_lora_layers(
            lora.path, {k: tuple(v.shape) for k, v in tensors.items()}, lora.metadata, self.te_targets, alphas
        )
        layers = {}
        for module, (down, up, scale) in entries.items():
            d, u = tensors[down].to(self.dtype or torch.float32), tensors[up].to(self.dtype or torch.float32)
            for key, t in ((down, d), (up, u)):
                if not bool(torch.isfinite(t).all()):
                    raise AdapterValueError(f"{lora.path}: tensor {key!r} holds NaN or Inf")
            layers[module] = lora_formats.LoraLayer(down=d, up=u, scale=scale)
        return TextEncoderLora(layers)

    def _rank1_shapes(self) -> dict:
        """attn2 K/V weight shapes of the (frozen) base, walked once: every rank1 load needs them."""
        if self._shapes_cache is None:
            self._shapes_cache = rank1_format.base_shapes(self.unet)
        return self._shapes_cache

    def _kv_base(self) -> dict:
        """attn2 K/V weights of the (frozen) base, walked once: every kv load needs them."""
        if self._kv_cache is None:
            self._kv_cache = kv_format.base_kv_weights(self.unet)
        return self._kv_cache

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = rank1_format.fingerprint(self.unet)
        return self._fingerprint

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
        return errors

    def unregister(self, name: str) -> None:
        """Forget `name`. An adapter a running request uses cannot be unregistered."""
        with self.boundary, self._lock:
            self.info(name)
            if self._pins.get(name):
                raise AdapterError(f"adapter {name!r} is in use by a running request; unregister it after the batch")
            del self._infos[name]
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
        """Bytes of adapter weights resident per tier: host cache (as stored) and device pools."""
        return {"host": sum(n for _, n in self._host.values()), "device": self.device_bytes()}

    def device_bytes(self) -> int:
        return sum(r.nbytes() for r in self.runtimes)

    def _check_path(self, path) -> str:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise AdapterNotFoundError(f"{path}: no such file or folder")
        if self.root is not None:
            real = os.path.realpath(path)
            if os.path.commonpath([real, self.root]) != self.root:
                raise AdapterPathError(f"{path}: resolves to {real}, outside adapter_root {self.root}")
        return path

    # ------------------------------------------------------------------ requests
    def resolve(self, adapters: list[Adapter]) -> list[Adapter]:
        """Check that every adapter a request names is registered, once."""
        seen = set()
        for a in adapters:
            if not ADAPTER_NAME.match(a.name):
                raise RequestError(f"adapter name {a.name!r} must match [A-Za-z0-9._-]+")
            if a.name in seen:
                raise RequestError(f"adapters: {a.name!r} is named twice")
            seen.add(a.name)
            self.info(a.name)
        return adapters

    def stats(self) -> dict:
        """Host-cache counters since construction: hits, misses, loads (files read and validated)
        and load_seconds (time spent reading them), for a server's /metrics."""
        with self._lock:
            return dict(self._cache_counts)

    def load(self, name: str):
        """The fully read, validated weights of `name`, through the host cache."""
        with self._lock:
            if name in self._host:
                self._host.move_to_end(name)
                self._cache_counts["hits"] += 1
                return self._host[name][0]
            info = self.info(name)
            self._cache_counts["misses"] += 1
        t_load = time.perf_counter()
        if info.family in LORA_LIKE:
            obj = read_lora(info.path, self._module_names, dtype=self.dtype or torch.float32)
            if set(obj.layers) != set(info.targets):
                raise AdapterError(f"{info.path}: file changed since registration (targets differ)")
            obj.text_encoder = self._text_encoder_lora(obj)
        elif info.family == "rank1":
            obj = rank1_format.read_rank1(
                info.path, base_shapes=self._rank1_shapes(), fingerprint=self.fingerprint
            )
        elif info.family == "kv":
            obj = kv_format.read_kv(info.path, self._kv_base())
            obj.layers = {k: _to(v, self.dtype) for k, v in obj.layers.items()}
        else:
            raise AdapterFormatError(f"{info.path}: no loader for family {info.family!r}")
        with self._lock:
            self._cache_counts["loads"] += 1
            self._cache_counts["load_seconds"] += time.perf_counter() - t_load
            self._host[name] = (obj, info.nbytes)
            self._shrink_host()
        return obj

    def _shrink_host(self) -> None:
        """Evict least-recently-used adapters past the budget; never one a running batch uses."""
        if self.host_cache_bytes is None:
            return
        total = sum(n for _, n in self._host.values())
        for name in list(self._host):
            if total <= self.host_cache_bytes:
                break
            if self._pins.get(name):
                continue
            total -= self._host.pop(name)[1]


def _to(layer, dtype):
    """A KvLayer's tensors in the engine's dtype (dense deltas stay dense, factors stay factors)."""
    if dtype is None:
        return layer
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return type(layer)(
        dk=cast(layer.dk),
        dv=cast(layer.dv),
        k_factors=None if layer.k_factors is None else tuple(map(cast, layer.k_factors)),
        v_factors=None if layer.v_factors is None else tuple(map(cast, layer.v_factors)),
    )
