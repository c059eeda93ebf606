"""The broadcast channel between the ingress and every replica: a small named Ray actor.

Ray Serve has no call that reaches every replica of a deployment, so adapter registrations go
through an ordered log here. Each replica polls it (`report`, every SYNC_SECONDS): it sends its
stats and the results of the entries it applied, and receives the entries it has not applied
yet. A replacement replica starts from entry 0, so it ends in the same state as the others.
The ingress appends an entry and waits until every live replica applied it.
"""

from __future__ import annotations

import time

NAMESPACE = "impasto"  # the directory actor's Ray namespace (replicas live in "serve")
SYNC_SECONDS = 0.2  # replicas poll this often: the delay of a registration and of the stats
STALE_SECONDS = 3.0  # a replica silent this long is taken as gone (killed, or being replaced)
KEPT_RESULTS = 64  # per replica, results of the latest entries (the ingress waits only for new ones)


def connect(name: str):
    """The directory actor `name`, made by whichever replica asks first. Detached: it outlives
    any one replica (a replacement replays its log); one per deployed app (see ray.build)."""
    import ray

    return (ray.remote(num_cpus=0)(Directory)
            .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote())


class Directory:
    """Semantics:
      append(op, args) -> seq               log entry seq (1-based): ("register", {name, path, family,
                                            suffix, token}) or ("unregister", {name})
      report(replica, applied, results, stats) -> [(seq, op, args)]   entries after `applied`
      state() -> {replica: {age, applied, results, stats}}   replicas heard within STALE_SECONDS
      forget(replica)                       drop a replica that stopped
      count(ingress, routing) -> {decision: n}   an ingress replica's routing counters in, the
                                            sum over the ingress replicas out (one /metrics for all)
    """

    def __init__(self):
        self.log: list[tuple[str, dict]] = []
        self.replicas: dict[str, dict] = {}
        self.ingresses: dict[str, dict] = {}

    def append(self, op: str, args: dict) -> int:
        self.log.append((op, args))
        return len(self.log)

    def report(self, replica: str, applied: int, results: dict, stats: dict) -> list:
        r = self.replicas.setdefault(replica, {"results": {}})
        r.update(t=time.monotonic(), applied=applied, stats=stats)
        r["results"].update(results)
        for seq in sorted(r["results"])[:-KEPT_RESULTS]:
            del r["results"][seq]
        return [(seq, op, args) for seq, (op, args) in enumerate(self.log[applied:], start=applied + 1)]

    def state(self) -> dict:
        now = time.monotonic()
        return {rid: {"age": now - r["t"], "applied": r["applied"], "results": dict(r["results"]),
                      "stats": r["stats"]}
                for rid, r in self.replicas.items() if now - r["t"] < STALE_SECONDS}

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def count(self, ingress: str, routing: dict) -> dict:
        self.ingresses[ingress] = dict(routing)
        total: dict = {}
        for counts in self.ingresses.values():  # a replaced ingress's decisions still happened
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        return total
