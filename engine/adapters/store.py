"""The adapter store: registered adapters by name (headers only), loaded on demand.

Tiers: disk (the file as registered) -> host cache (fully read, validated LoraFile objects,
LRU, `host_cache_bytes`) -> device slot pools (`LoraRuntime`, fixed slots per rank bucket).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ..api import ADAPTER_NAME, Adapter, AdapterInfo
from ..errors import AdapterError, AdapterFormatError, AdapterNameError, RequestError
from .lora import lora_targets, validate_lora_header
from .lora_formats import read_lora, read_lora_header

FAMILIES = ("lora",)


class AdapterStore:
    """Adapters known to one engine: `register(name, path)` reads and validates the header;
    weights are read when a request first needs them."""

    def __init__(self, unet, *, root=None, host_cache_bytes=None, device_pool_bytes=None, max_rank=64, dtype=None):
        self.unet = unet
        self.root = os.path.realpath(root) if root else None
        self.host_cache_bytes = host_cache_bytes
        self.device_pool_bytes = device_pool_bytes
        self.max_rank = max_rank
        self.dtype = dtype
        self.targets = lora_targets(unet)
        self._module_names = set(dict(unet.named_modules()))
        self._infos: dict[str, AdapterInfo] = {}
        self._host: OrderedDict = OrderedDict()  # name -> (LoraFile, nbytes), LRU order
        self._lock = threading.RLock()

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
        family = family or "lora"
        if family not in FAMILIES:
            raise AdapterFormatError(f"{path}: unknown adapter family {family!r} (known: {', '.join(FAMILIES)})")
        header = read_lora_header(path, self._module_names)
        validate_lora_header(header, self.targets, self.max_rank)
        info = AdapterInfo(
            name=name,
            path=path,
            family=family,
            format=header.format,
            rank=max(layer.rank for layer in header.layers.values()),
            targets=tuple(sorted(header.layers)),
            nbytes=header.nbytes,
            token=token,
            suffix=suffix,
        )
        with self._lock:
            if name in self._infos:
                raise AdapterNameError(f"adapter name {name!r} is already registered (to {self._infos[name].path})")
            self._infos[name] = info
        return info

    def unregister(self, name: str) -> None:
        with self._lock:
            self.info(name)
            del self._infos[name]
            self._host.pop(name, None)

    def _check_path(self, path) -> str:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise AdapterFormatError(f"{path}: no such file or folder")
        if self.root is not None:
            real = os.path.realpath(path)
            if os.path.commonpath([real, self.root]) != self.root:
                raise AdapterFormatError(f"{path}: resolves to {real}, outside adapter_root {self.root}")
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

    def load(self, name: str):
        """The fully read, validated weights of `name`, through the host cache."""
        with self._lock:
            if name in self._host:
                self._host.move_to_end(name)
                return self._host[name][0]
            info = self.info(name)
        lora = read_lora(info.path, self._module_names, dtype=self.dtype) if self.dtype else read_lora(
            info.path, self._module_names
        )
        if set(lora.layers) != set(info.targets):
            raise AdapterError(f"{info.path}: file changed since registration (targets differ)")
        with self._lock:
            self._host[name] = (lora, info.nbytes)
            self._shrink_host()
        return lora

    def _shrink_host(self) -> None:
        if self.host_cache_bytes is None:
            return
        total = sum(n for _, n in self._host.values())
        while total > self.host_cache_bytes and len(self._host) > 1:
            _, (_, n) = self._host.popitem(last=False)
            total -= n
