"""Which multiplexed model id a request is routed by, and how hot ids are spread.

Ray Serve routes a request with `multiplexed_model_id=key` to a replica that already loaded
`key` (then to the replica with the fewest loaded ids): that is impasto's adapter affinity.
Ray takes one id per request, so the key is the request's first adapter (its main concept; the
others load lazily on the replica). A hot id can stay pinned to one replica (ray#48741), so
past `spread_above` requests of one key in flight, the next ones get the key `name~1`,
`name~2`, ... (one per further replica): another id, so Ray places it on another replica, and
the replica's loader strips the suffix. Adapter names never hold "~" (api.ADAPTER_NAME).
"""

from __future__ import annotations

import threading

SPREAD = "~"


def routing_key(request) -> str | None:
    """The request's first adapter's name (adapters are names, (name, scale) or Adapter), or
    None for a request without adapters (Ray routes it to any replica)."""
    if not request.adapters:
        return None
    first = request.adapters[0]
    if isinstance(first, str):
        return first
    if isinstance(first, tuple):
        return str(first[0])
    return first.name


def adapter_of(key: str) -> str:
    """The adapter name a (possibly spread) key stands for."""
    return key.split(SPREAD, 1)[0]


class Spreader:
    """Semantics:
      key(request) -> str | None   the multiplexed id: routing_key, suffixed ~k (k < replicas)
                                   once `spread_above` requests of that adapter are in flight
      done(key)                    the request routed by `key` finished
    Counts are per adapter name; `in_flight` holds only names with requests in flight."""

    def __init__(self, replicas: int, spread_above: int):
        if replicas < 1 or spread_above < 1:
            raise ValueError(f"replicas and spread_above must be >= 1, got {replicas}, {spread_above}")
        self.replicas, self.spread_above = replicas, spread_above
        self.in_flight: dict[str, int] = {}
        self.spread = 0  # requests sent under a suffixed key
        self._lock = threading.Lock()

    def key(self, request) -> str | None:
        name = routing_key(request)
        if name is None:
            return None
        with self._lock:
            n = self.in_flight.get(name, 0)
            self.in_flight[name] = n + 1
            k = (n // self.spread_above) % self.replicas
            if k:
                self.spread += 1
        return name if k == 0 else f"{name}{SPREAD}{k}"

    def done(self, key: str | None) -> None:
        if key is None:
            return
        name = adapter_of(key)
        with self._lock:
            n = self.in_flight.get(name, 0) - 1
            if n > 0:
                self.in_flight[name] = n
            else:
                self.in_flight.pop(name, None)
