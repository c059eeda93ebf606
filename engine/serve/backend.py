"""What the HTTP layer needs from whatever generates the images: one small interface.

`LocalBackend` wraps an in-process `impasto.Engine`; a handle to Ray Serve replicas implements
the same methods, so `create_app` serves both with one set of endpoints.
"""

from __future__ import annotations

import os
from typing import Protocol

from .a1111 import sampler_name


class Backend(Protocol):
    """Semantics:
      submit(request)      -> a Job (progress, cancel(), done(), output(), add_done_callback(fn));
                              raises at once RequestError / AdapterError / EngineBusyError /
                              EngineClosedError, exactly as `Engine.submit`
      adapters()           -> [AdapterInfo] of every registered adapter, sorted by name
      register(name, path, family=, suffix=, token=) -> AdapterInfo (blocks until a step boundary)
      unregister(name)     -> None (blocks until a step boundary)
      stats()              -> {queued, running, forwards, rows_last_forward, alive, adapter_cache}
      limits               -> the operator limits (`impasto.LIMITS` keys)
      model_name, sampler  -> what A1111 clients see as the checkpoint and the sampler
      default_size         -> (width, height) when a request gives none
      close()              -> stop; in-flight requests end with EngineClosedError
    """

    model_name: str
    sampler: str
    limits: dict
    default_size: tuple

    def submit(self, request): ...
    def adapters(self) -> list: ...
    def register(self, name, path, *, family=None, suffix=None, token=None): ...
    def unregister(self, name) -> None: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


class LocalBackend:
    """A `Backend` over one in-process Engine (see `Backend` for the semantics)."""

    def __init__(self, engine, *, model_name: str | None = None):
        self.engine = engine
        path = str(engine.base.path)
        name = os.path.basename(os.path.normpath(path))
        name = os.path.splitext(name)[0] if os.path.isfile(path) else name  # a single file: its stem, as A1111
        self.model_name = model_name or name or "model"
        self.sampler = sampler_name(type(engine.base.scheduler).__name__)
        self.limits = dict(engine.limits)
        side = engine.base.unet.config.sample_size * engine.base.vae_scale_factor
        self.default_size = (side, side)

    def submit(self, request):
        return self.engine.submit(request)

    def adapters(self) -> list:
        store = self.engine.adapters
        return [store.info(n) for n in store.names()]

    def register(self, name, path, *, family=None, suffix=None, token=None):
        return self.engine.adapters.register(name, path, family=family, suffix=suffix, token=token)

    def unregister(self, name) -> None:
        self.engine.adapters.unregister(name)

    def stats(self) -> dict:
        stats = dict(self.engine.stats())
        stats["adapter_cache"] = self.engine.adapters.stats()
        return stats

    def close(self) -> None:
        self.engine.close()
