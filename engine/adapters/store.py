"""The adapter store: registered adapters by name (headers only), loaded on demand."""

from __future__ import annotations

import threading

from ..api import ADAPTER_NAME, Adapter, AdapterInfo
from ..errors import AdapterNameError, RequestError


class AdapterStore:
    """Adapters known to one engine: `register(name, path)` reads and validates the header;
    weights are read when a request first needs them."""

    def __init__(self, unet, *, root=None, host_cache_bytes=None, device_pool_bytes=None, max_rank=64):
        self.unet = unet
        self.root = root
        self.host_cache_bytes = host_cache_bytes
        self.device_pool_bytes = device_pool_bytes
        self.max_rank = max_rank
        self._infos: dict[str, AdapterInfo] = {}
        self._lock = threading.RLock()

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def names(self) -> list[str]:
        return sorted(self._infos)

    def info(self, name: str) -> AdapterInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise AdapterNameError(f"unknown adapter {name!r}: not registered") from None

    def unregister(self, name: str) -> None:
        with self._lock:
            self.info(name)
            del self._infos[name]

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
