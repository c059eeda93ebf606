"""The ingress side: `RayBackend`, the `serve.Backend` that create_app serves, over a handle
to the replica deployment; and `Ingress`, the deployment that builds that app in its replica.

create_app calls backend methods synchronously, from threads off its event loop (a submit
waits while a replica starts); Ray forbids blocking handle calls on an event loop, so every
handle call runs on this backend's own loop (one thread) and the caller waits for it with a
bound. Jobs follow their replica's stream on that loop.

A job of `POST /v1/jobs` is kept by the replica that runs it (`keep`), and its id names that
replica and the replica's key for each image: `REPLICA-KEY[_REPLICA-KEY...]`. An ingress that
does not hold the job (another ingress replica, or this one after a restart) follows it again
from its replicas (`find`), so `GET /v1/jobs/{id}` and its event stream work whichever
ingress replica Ray's proxy picks.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from ray import serve

from ...api import GenerationOutput
from ...worker import JobResult
from ...errors import AdapterError, EngineClosedError, RequestCancelledError
from .directory import STALE_SECONDS, SYNC_SECONDS, connect
from .routing import Spreader

JOB_SEPARATOR, KEY_SEPARATOR = "_", "-"  # job id: REPLICA-KEY per image, joined by "_"
SUBMIT_SECONDS = 60.0  # the longest a submit waits for a replica to accept (one is starting)
CALL_SECONDS = 30.0  # adapters(), stats(), and each replica's share of a registration


class RemoteJob(JobResult):
    """A request running on a replica, as create_app sees a Job (worker.Job's semantics):
    progress, done(), cancel(), output(timeout), result(timeout), add_done_callback(fn)."""

    def __init__(self, request, backend):
        super().__init__()
        self.request, self._backend = request, backend
        self._steps = 0
        self._stream = None
        self._cancelled = False
        self.replica = self.key = None  # the replica running it, and its key there
        self.owner = None  # set once the replica keeps the job (then cancel goes to the replica)

    @property
    def progress(self) -> tuple[int, int]:
        return self._steps, getattr(self.request, "steps", 0)

    def cancel(self) -> bool:
        if self.done():
            return False
        self._cancelled = True
        if self.owner is not None:  # kept: it outlives its stream, so tell the replica
            self._backend._loop.call_soon_threadsafe(self._backend._cancel_kept, self)
            return True
        stream = self._stream
        if stream is not None:
            self._backend._loop.call_soon_threadsafe(stream.cancel)
        return True


class RayBackend:
    """A `serve.Backend` over Ray Serve replicas (see serve.backend.Backend for the semantics).

    submit routes by adapter affinity (routing.Spreader's key as the multiplexed model id) or,
    with affinity=False, by Ray's default routing; register/unregister go to every replica
    through the directory; stats() sums the replicas' stats and adds per-replica and routing
    metric families for /metrics."""

    def __init__(self, handle, directory, describe: dict, *, replicas: int, spread_above: int, affinity: bool = True,
                 ingress_id: str = "ingress"):
        self.handle, self.directory, self.affinity = handle, directory, affinity
        self.model_name, self.sampler = describe["model_name"], describe["sampler"]
        self.limits, self.default_size = describe["limits"], tuple(describe["default_size"])
        self.spreader = Spreader(replicas, spread_above)
        self.ingress_id = ingress_id
        self.routing = collections.Counter()  # hit / miss / none (no adapter) / default (affinity off)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="impasto-ray-backend", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._report_routing(), self._loop)

    async def _report_routing(self) -> None:
        """Add this ingress's routing counters to the directory every SYNC_SECONDS (for the
        /metrics of whichever ingress replica answers)."""
        while True:
            with self._lock:
                mine = dict(self.routing, spread=self.spreader.spread)
            try:
                await self.directory.count.remote(self.ingress_id, mine)
            except Exception:  # noqa: BLE001 - the directory restarting: next period
                pass
            await asyncio.sleep(SYNC_SECONDS)

    def _call(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise EngineClosedError(f"no replica answered within {timeout:g} s") from None

    # ------------------------------------------------------------------ requests
    def submit(self, request) -> RemoteJob:
        key = self.spreader.key(request) if self.affinity else None
        job = RemoteJob(request, self)
        try:
            self._call(self._start(job, key), SUBMIT_SECONDS)
        except BaseException:
            self.spreader.done(key)
            raise
        return job

    async def _start(self, job: RemoteJob, key: str | None) -> None:
        handle = self.handle.options(stream=True, multiplexed_model_id=key) if key else self.handle.options(stream=True)
        stream = handle.run.remote(job.request)
        try:
            kind, value = await stream.__anext__()
        except Exception as e:  # noqa: BLE001 - the replica died before answering
            raise EngineClosedError(f"the replica stopped before accepting the request ({type(e).__name__}); "
                                    f"retry") from None
        if kind == "refused":
            raise value
        job.replica, job.key = value["replica"], value["key"]
        with self._lock:
            self.routing["default" if not self.affinity else "none" if key is None
                         else "hit" if value["hit"] else "miss"] += 1
        job._stream = stream
        self._loop.create_task(self._follow(job, stream, key))

    async def _follow(self, job: RemoteJob, stream, key: str | None) -> None:
        try:
            async for kind, value in stream:
                if kind == "progress":
                    job._steps = value
                elif kind == "done":
                    if value.error is None:
                        job._steps = job.request.steps  # the last step can end the job before its poll
                    job._resolve(value)
            if not job.done():
                raise EngineClosedError("the replica's stream ended without a result")
        except Exception as e:  # noqa: BLE001 - becomes this request's error, as in the engine
            if job._cancelled:
                err = RequestCancelledError("the request was cancelled")
            elif isinstance(e, EngineClosedError):
                err = e
            else:
                err = EngineClosedError(f"replica {job.replica} stopped before the request finished "
                                        f"({type(e).__name__}); retry")
            job._resolve(GenerationOutput(error=err, seed=job.request.seed))
        finally:
            self.spreader.done(key)

    # ------------------------------------------------------------------ kept jobs
    def keep(self, task, ttl: float) -> str:
        """Semantics: have each image's replica keep its job for `task.owner` (a job of POST
        /v1/jobs, readable from any ingress) until `ttl` seconds after it ends; the job id
        naming those replicas and keys. Raises EngineClosedError when a replica no longer
        holds its running job (it stopped)."""
        for job, image in zip(task.jobs, task.images):
            kept = self._call(self._remote(self.handle.keep, replica=job.replica, key=job.key, owner=task.owner,
                                           image=image, created=task.created, ttl=ttl), CALL_SECONDS)
            if not kept and not job.done():
                raise EngineClosedError(f"replica {job.replica} stopped before keeping the job; retry")
            job.owner = task.owner
        return JOB_SEPARATOR.join(f"{job.replica}{KEY_SEPARATOR}{job.key}" for job in task.jobs)

    def find(self, task_id: str, owner: str):
        """Semantics: the Task `task_id` of `owner`, followed again from the replicas its id
        names, or None when the id is malformed, another caller's, or its replicas no longer
        hold it (expired, or the replica stopped)."""
        from ..tasks import Task

        parts = [p.rpartition(KEY_SEPARATOR) for p in task_id.split(JOB_SEPARATOR)]
        if not parts or len(parts) > self.limits["max_num_images"] or not all(r and k for r, _, k in parts):
            return None
        jobs, images, created = [], [], None
        for replica, _, key in parts:
            job = RemoteJob(None, self)
            job.replica, job.key, job.owner = replica, key, owner
            info = self._call(self._follow_kept(job), CALL_SECONDS)
            if info is None:
                for j in jobs:
                    self._loop.call_soon_threadsafe(j._stream.cancel)
                return None
            jobs.append(job)
            images.append(info["image"])
            created = info["created"] if created is None else created
        return Task(owner, images, jobs, "job", id=task_id, created=created)

    async def _follow_kept(self, job: RemoteJob):
        stream = self.handle.options(stream=True).follow.remote(replica=job.replica, key=job.key, owner=job.owner)
        try:
            kind, value = await stream.__anext__()
        except Exception:  # noqa: BLE001 - no replica answered: nobody holds the job
            return None
        if kind != "accepted":
            return None
        job.request = value["image"].request()
        job._stream = stream
        self._loop.create_task(self._follow(job, stream, None))
        return value

    def _cancel_kept(self, job: RemoteJob) -> None:
        async def cancel():
            try:
                await self.handle.cancel.remote(replica=job.replica, key=job.key, owner=job.owner)
            except Exception:  # noqa: BLE001 - the replica stopped: the job failed already
                pass

        self._loop.create_task(cancel())

    # ------------------------------------------------------------------ adapters
    def adapters(self) -> list:
        return self._call(self._remote(self.handle.adapters), CALL_SECONDS)

    async def _remote(self, method, *args, **kwargs):
        return await method.remote(*args, **kwargs)

    def register(self, name, path, *, family=None, suffix=None, token=None):
        args = {"name": name, "path": str(path), "family": family, "suffix": suffix, "token": token}
        ok = self._broadcast("register", args)
        errors = [v for status, v in ok if status == "error"]
        if errors:
            self._broadcast("unregister", {"name": name})  # on the replicas that took it
            raise errors[0]
        return ok[0][1]

    def unregister(self, name) -> None:
        before = next((a for a in self.adapters() if a.name == name), None)
        ok = self._broadcast("unregister", {"name": name})
        errors = [v for status, v in ok if status == "error"]
        if errors:
            if before is not None:  # in use on one replica: put it back everywhere
                self._broadcast("register", {"name": name, "path": before.path, "family": before.family,
                                             "suffix": before.suffix, "token": before.token})
            raise errors[0]

    def _broadcast(self, op: str, args: dict) -> list:
        """Append one directory entry; wait until every live replica applied it; their results."""
        seq = self._call(self._remote(self.directory.append, op, args), CALL_SECONDS)
        deadline = time.monotonic() + CALL_SECONDS
        while True:
            state = self._call(self._remote(self.directory.state), CALL_SECONDS)
            if state and all(seq in r["results"] or r["applied"] >= seq for r in state.values()):
                results = [r["results"][seq] for r in state.values() if seq in r["results"]]
                if results:
                    return results
            if time.monotonic() > deadline:
                raise AdapterError(f"adapter {args['name']!r}: not every replica applied the {op} within "
                                   f"{CALL_SECONDS:g} s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ operations
    def replica_stats(self) -> dict:
        """{replica id: its stats} of the replicas heard within the last few seconds."""
        state = self._call(self._remote(self.directory.state), CALL_SECONDS)
        return {rid: r["stats"] for rid, r in state.items() if r["age"] < STALE_SECONDS}

    def stats(self) -> dict:
        per = self.replica_stats()
        total = {"queued": 0, "running": 0, "forwards": 0, "rows_last_forward": 0, "adapter_cache": {}}
        for s in per.values():
            for k in ("queued", "running", "forwards", "rows_last_forward"):
                total[k] += s[k]
            for k, v in s["adapter_cache"].items():
                total["adapter_cache"][k] = total["adapter_cache"].get(k, 0) + v
        total["alive"] = any(s["alive"] for s in per.values())
        total["replicas"] = per
        with self._lock:
            mine = dict(self.routing, spread=self.spreader.spread)
        # every ingress replica's decisions, whichever one Ray's proxy asked for /metrics
        total["routing"] = self._call(self._remote(self.directory.count, self.ingress_id, mine), CALL_SECONDS)
        total["metric_families"] = _families(per, total["routing"])
        return total

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def _families(per: dict, routing: dict) -> list:
    """Per-replica gauges and counters and the ingress's routing decisions, for /metrics."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    queued = GaugeMetricFamily("impasto_replica_queue_depth", "requests waiting, per replica", labels=["replica"])
    running = GaugeMetricFamily("impasto_replica_running_requests", "requests denoising, per replica",
                                labels=["replica"])
    models = GaugeMetricFamily("impasto_replica_multiplexed_models", "multiplexed ids loaded, per replica",
                               labels=["replica"])
    loads = CounterMetricFamily("impasto_replica_adapter_loads", "adapter files read, per replica", labels=["replica"])
    hits = CounterMetricFamily("impasto_replica_affinity", "requests whose multiplexed id was (hit) or was not (miss) "
                               "loaded on the replica they reached", labels=["replica", "result"])
    for rid, s in per.items():
        queued.add_metric([rid], s["queued"])
        running.add_metric([rid], s["running"])
        models.add_metric([rid], len(s["multiplexed"]))
        loads.add_metric([rid], s["adapter_cache"].get("loads", 0))
        hits.add_metric([rid, "hit"], s["affinity_hits"])
        hits.add_metric([rid, "miss"], s["affinity_misses"])
    routed = CounterMetricFamily("impasto_routing", "the ingress's routing decisions: affinity hit or miss, no "
                                 "adapter, Ray's default routing, spread (a hot id sent under a suffix)",
                                 labels=["decision"])
    for decision in ("hit", "miss", "none", "default", "spread"):
        routed.add_metric([decision], routing.get(decision, 0))
    return [queued, running, models, loads, hits, routed]


@serve.ingress()
class Ingress:
    """The HTTP ingress: create_app (impasto serve's own endpoints) over a RayBackend."""

    async def __init__(self, replica, directory: str, settings: dict, replicas: int, spread_above: int,
                       affinity: bool = True):
        describe = await replica.describe.remote()
        self.backend = RayBackend(replica, connect(directory), describe, replicas=replicas,
                                  spread_above=spread_above, affinity=affinity,
                                  ingress_id=serve.get_replica_context().replica_id.unique_id)
        self.settings = settings

    def __serve_build_asgi_app__(self):
        from ..app import Settings, create_app

        return create_app(self.backend, Settings(**self.settings))
