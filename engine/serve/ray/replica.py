"""One Ray Serve replica: one Engine and its step-level worker, fed by the ingress.

`run` is a streaming method: it yields ("accepted", info) or ("refused", error) at once, then
("progress", steps_done) per step, then ("done", GenerationOutput). The stream is the job's
link to the replica that runs it: progress, the result and cancellation (the ingress cancels
the stream; the replica cancels the engine's job) all travel on it. A job of `POST /v1/jobs`
is also *kept* here (`keep`): it no longer depends on the stream, and any ingress replica can
follow it again (`follow`, `cancel`) by the replica id its job id names, which
routing.JobRouter sends to this replica. Requests with different multiplexed ids share this
replica's denoising steps: `@serve.batch` is not used (it splits batches by model id and
admits nothing between steps).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
import secrets
import time

from ray import serve

from ...errors import AdapterError, ImpastoError
from ..a1111 import sampler_name
from .directory import SYNC_SECONDS, connect
from .routing import adapter_of

POLL_SECONDS = 0.005  # the engine has no per-step callback: a job's progress is polled this often
KEPT_KEYS = 1024  # per-key counters kept for the stats (most recent keys)
MAX_KEPT_JOBS = 1024  # finished kept jobs held for `follow` (oldest dropped first), besides their ttl
ENDED_JOBS = 256  # jobs whose stream ended, still keepable (the ingress keeps a job just after its submit)
WARM_WAIT_SECONDS = 0.05  # the loader waits this long for a step boundary to fill a slot, else leaves it to admission


class _Kept:
    """A job of POST /v1/jobs held by this replica: the engine Job, the ingress's image
    parameters, a digest of its owner, when it was created and how long it stays readable."""

    def __init__(self, job, image, owner: str, created: float, ttl: float):
        self.job, self.image, self.owner, self.created, self.ttl = job, image, owner, created, ttl
        self.finished: float | None = None


class _Warm:
    """What the multiplexed loader returns for a key: its adapter is in the host cache. Ray
    calls __del__ when it evicts the key (LRU over max_num_models_per_replica)."""

    def __init__(self, replica, key: str):
        self.replica, self.key = replica, key

    def __del__(self):
        self.replica.models.discard(self.key)


class Replica:
    """Semantics (remote methods, through a DeploymentHandle):
      run(request)       async stream, see the module docstring; routed by multiplexed id
      keep(replica=, key=, owner=, image=, created=, ttl=) -> bool   hold job `key` past its
                         stream (False: no such job here, e.g. it already ended)
      follow(replica=, key=, owner=)   async stream of a kept job: ("accepted", {image, created})
                         or ("missing", None), then progress and done as `run`
      cancel(replica=, key=, owner=) -> bool   cancel a kept job
      describe()         {model_name, sampler, limits, default_size, replica}
      adapters()         [AdapterInfo] of this replica's store (every replica holds the same)
    """

    async def __init__(self, model: str, adapter_root: str, engine_kwargs: dict, directory: str,
                       max_models: int, threads: int, warm_up: bool = True):
        import torch

        import impasto

        torch.set_num_threads(threads)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.engine = impasto.Engine.from_pretrained(model, adapter_root=adapter_root, **engine_kwargs)
        self.refused = self.engine.adapters.register_dir(adapter_root)
        if warm_up:  # pay the first forward's one-time setup before taking requests
            self.engine.generate("warm up", steps=1, seed=0, output_type="latent")
        self.model_name = "tiny" if model == "tiny" else os.path.basename(os.path.normpath(model)) or "model"
        self.models: set[str] = set()  # multiplexed ids loaded here now
        self.loads: collections.OrderedDict[str, int] = collections.OrderedDict()  # loader calls per key
        self.seen: collections.OrderedDict[str, int] = collections.OrderedDict()  # requests per key
        self.counts = {"requests": 0, "loader_calls": 0, "affinity_hits": 0, "affinity_misses": 0,
                       "slot_warms": 0}

        async def load(key: str) -> _Warm:
            # Ray holds a replica-wide lock around this loader (ray#65346): keep it cheap, the
            # host-cache read of one small file and, if a step boundary comes within
            # WARM_WAIT_SECONDS, the copy into a slot (else admission copies it, as for any request).
            self.counts["loader_calls"] += 1
            _bump(self.loads, key)
            try:
                if await asyncio.to_thread(self.engine.warm, adapter_of(key), wait=WARM_WAIT_SECONDS):
                    self.counts["slot_warms"] += 1
            except ImpastoError:
                pass  # unknown or bad adapter: the request's own submit reports it
            self.models.add(key)
            return _Warm(self, key)

        self._warm = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self.directory = connect(directory)
        self.applied, self.results = 0, {}
        self.live: dict[str, object] = {}  # key -> engine Job, while its `run` stream is open
        self.ended: collections.OrderedDict[str, object] = collections.OrderedDict()  # then, the latest few
        self.kept: collections.OrderedDict[str, _Kept] = collections.OrderedDict()
        self._sync_task = asyncio.get_running_loop().create_task(self._sync())

    # ------------------------------------------------------------------ requests
    async def run(self, request):
        key = serve.get_multiplexed_model_id()
        hit = None
        if key:
            hit = key in self.models
            self.counts["affinity_hits" if hit else "affinity_misses"] += 1
            _bump(self.seen, key)
            await self._warm(key)
        self.counts["requests"] += 1
        try:
            job = self.engine.submit(request)
        except ImpastoError as e:
            yield ("refused", e)
            return
        job_key = secrets.token_hex(8)
        self.live[job_key] = job
        try:
            yield ("accepted", {"replica": self.id, "hit": hit, "key": job_key})
            async for message in _progress(job):
                yield message
        finally:
            self.live.pop(job_key, None)
            if job_key not in self.kept:
                job.cancel()  # the ingress went away or cancelled: drop the request at the next step
                if job.done():  # a short job may end before the ingress asks to keep it
                    self.ended[job_key] = job
                    while len(self.ended) > ENDED_JOBS:
                        self.ended.popitem(last=False)

    def keep(self, *, replica: str, key: str, owner: str, image, created: float, ttl: float) -> bool:
        job = self.live.get(key) or self.ended.pop(key, None)
        if replica != self.id or job is None:
            return False
        self._expire()
        self.kept[key] = _Kept(job, image, _digest(owner), created, ttl)
        return True

    async def follow(self, *, replica: str, key: str, owner: str):
        kept = self._kept(replica, key, owner)
        if kept is None:
            yield ("missing", None)
            return
        yield ("accepted", {"replica": self.id, "image": kept.image, "created": kept.created})
        async for message in _progress(kept.job):
            yield message

    def cancel(self, *, replica: str, key: str, owner: str) -> bool:
        kept = self._kept(replica, key, owner)
        return kept is not None and kept.job.cancel()

    def _kept(self, replica: str, key: str, owner: str) -> _Kept | None:
        self._expire()
        kept = self.kept.get(key) if replica == self.id else None
        return kept if kept is not None and kept.owner == _digest(owner) else None

    def _expire(self) -> None:
        """Drop kept jobs finished longer ago than their ttl, and the oldest finished ones
        beyond MAX_KEPT_JOBS (running ones are bounded by the engine's max_queue)."""
        now = time.monotonic()
        finished = []
        for key, kept in list(self.kept.items()):
            if kept.job.done():
                kept.finished = kept.finished or now
                if now - kept.finished > kept.ttl:
                    del self.kept[key]
                else:
                    finished.append(key)
        for key in finished[: max(0, len(finished) - MAX_KEPT_JOBS)]:
            del self.kept[key]

    def describe(self) -> dict:
        base = self.engine.base
        side = base.unet.config.sample_size * base.vae_scale_factor
        return {"model_name": self.model_name, "sampler": sampler_name(type(base.scheduler).__name__),
                "limits": dict(self.engine.limits), "default_size": (side, side), "replica": self.id}

    def adapters(self) -> list:
        store = self.engine.adapters
        return [store.info(n) for n in store.names()]

    # ------------------------------------------------------------------ broadcast
    def stats(self) -> dict:
        s = dict(self.engine.stats())
        s["adapter_cache"] = self.engine.adapters.stats()
        s["adapters"] = len(self.engine.adapters.names())
        s["multiplexed"] = sorted(self.models)
        s["kept_jobs"] = len(self.kept)
        s["loads_by_key"] = dict(self.loads)
        s["seen_by_key"] = dict(self.seen)
        s.update(self.counts)
        return s

    async def _sync(self) -> None:
        """Report to the directory and apply the registrations this replica has not applied."""
        while True:
            try:
                self._expire()
                results, self.results = self.results, {}
                entries = await self.directory.report.remote(self.id, self.applied, results, self.stats())
                for seq, op, args in entries:
                    self.results[seq] = await asyncio.to_thread(self._apply, op, args)
                    self.applied = seq
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the directory restarting: try again next period
                pass
            await asyncio.sleep(SYNC_SECONDS)

    def _apply(self, op: str, args: dict) -> tuple:
        """One log entry: ("ok", AdapterInfo | None) or ("error", the store's exception)."""
        store = self.engine.adapters
        name = args["name"]
        try:
            if op == "register":
                if name in store.names() and os.path.realpath(store.info(name).path) == os.path.realpath(args["path"]):
                    store.unregister(name)  # found by register_dir at start: take the entry's options
                return "ok", store.register(name, args["path"], family=args.get("family"),
                                            suffix=args.get("suffix"), token=args.get("token"))
            if op == "unregister":
                if name in store.names():
                    store.unregister(name)
                return "ok", None
            return "error", AdapterError(f"unknown directory entry {op!r}")
        except ImpastoError as e:
            return "error", e

    def __del__(self):
        task = getattr(self, "_sync_task", None)
        if task is not None:
            task.cancel()
            self.directory.forget.remote(self.id)  # stopped on purpose: not a replica to wait for
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


async def _progress(job):
    """("progress", steps_done) whenever it changed (polled), then ("done", GenerationOutput)."""
    sent = 0
    while not job.done():
        await asyncio.sleep(POLL_SECONDS)
        step = job.progress[0]
        if step != sent:
            sent = step
            yield ("progress", step)
    yield ("done", job.output())


def _digest(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()


def _bump(counts: collections.OrderedDict, key: str) -> None:
    counts[key] = counts.pop(key, 0) + 1
    while len(counts) > KEPT_KEYS:
        counts.popitem(last=False)


