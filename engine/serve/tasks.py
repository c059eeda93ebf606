"""A task: what one HTTP call asked for (one image or many), as engine Jobs plus what the
responses need; the table of tasks by id and by caller.

Every image is its own engine request (A1111's seed + i), so a task holds several Jobs; they
are submitted together and share the engine's denoising steps.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import threading
import time
from dataclasses import dataclass, field

from ..api import Guidance, Request
from ..errors import RequestCancelledError
from .a1111 import infotext


@dataclass(frozen=True)
class Image:
    """The parameters of one image, as the engine and the `parameters` chunk see them."""

    prompt: str  # without <lora:...> tags
    negative_prompt: str | None
    steps: int
    cfg: float
    seed: int
    width: int
    height: int
    adapters: tuple = ()  # ((name, scale), ...)
    styles: tuple = ()  # ((name, weight), ...)
    timeout: float | None = None
    ip_adapter_image: tuple = ()  # encoded reference images (bytes) for an encoder adapter
    sampler: str | None = None  # an A1111 sampler name (engine/schedulers.py); None: the model's
    syntax: str | None = None  # "a1111": emphasis weights and BREAK (the A1111 endpoint); None: the engine's
    clip_skip: int | None = None

    def request(self) -> Request:
        guidance = Guidance(cfg=self.cfg, styles=dict(self.styles)) if self.styles else self.cfg
        return Request(self.prompt, adapters=list(self.adapters), guidance=guidance,
                       negative_prompt=self.negative_prompt, steps=self.steps, seed=self.seed,
                       height=self.height, width=self.width, timeout=self.timeout,
                       ip_adapter_image=list(self.ip_adapter_image) or None, scheduler=self.sampler,
                       prompt_syntax=self.syntax, clip_skip=self.clip_skip)

    def infotext(self, model: str, sampler: str) -> str:
        extra = {"Clip skip": self.clip_skip} if self.clip_skip and self.clip_skip > 1 else None
        return infotext(prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
                        sampler=self.sampler or sampler, cfg_scale=self.cfg, seed=self.seed, width=self.width,
                        height=self.height, model=model, adapters=self.adapters, styles=dict(self.styles),
                        extra=extra)


@dataclass
class Task:
    """Semantics:
      state     queued (no step done) | running | succeeded | failed | cancelled
      progress  (step, total): the least advanced image's steps, of the request's steps
      wait()    awaits every image (never raises); outputs() then gives their GenerationOutputs
      cancel()  cancels every image at the engine's next step boundary
    """

    owner: str
    images: list
    jobs: list
    kind: str  # "job" (POST /v1/jobs: outlives its connection) or "sync"
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    created: float = field(default_factory=time.time)

    def __post_init__(self):
        self._all_done = threading.Event()
        remaining = itertools.count()
        n = len(self.jobs)

        def one_done(_job):
            if next(remaining) == n - 1:
                self._all_done.set()

        for job in self.jobs:
            job.add_done_callback(one_done)

    def done(self) -> bool:
        return self._all_done.is_set()

    @property
    def progress(self) -> tuple[int, int]:
        return min(j.progress[0] for j in self.jobs), self.images[0].steps

    @property
    def state(self) -> str:
        if not self.done():
            return "running" if self.progress[0] > 0 else "queued"
        errors = [out.error for out in self.outputs() if out.error is not None]
        if any(isinstance(e, RequestCancelledError) for e in errors):
            return "cancelled"
        return "failed" if errors else "succeeded"

    def error(self):
        """The first image's error, or None."""
        return next((out.error for out in self.outputs() if out.error is not None), None)

    def outputs(self) -> list:
        return [j.output() for j in self.jobs]

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def wait(self) -> None:
        """Await every image without blocking the event loop (the Jobs resolve on the worker)."""
        if self.done():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def wake():
            if not fut.done():
                fut.set_result(None)

        def on_done(_job):
            if self.done():
                try:
                    loop.call_soon_threadsafe(wake)
                except RuntimeError:  # the loop closed (server stopping): nobody waits any more
                    pass

        for job in self.jobs:
            job.add_done_callback(on_done)
        await fut


class Tasks:
    """The tasks of one app: by id, by owner, and the in-flight count for draining. Finished
    tasks are kept `ttl` seconds (at most `keep` of them) for GET /v1/jobs/{id}."""

    def __init__(self, *, ttl: float = 3600.0, keep: int = 1000):
        self.ttl, self.keep = ttl, keep
        self._tasks: collections.OrderedDict[str, Task] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, task: Task) -> None:
        with self._lock:
            self._tasks[task.id] = task
            self._forget_old()

    def get(self, task_id: str, owner: str) -> Task | None:
        """The task `task_id` if `owner` created it (another caller's task does not exist for it)."""
        with self._lock:
            task = self._tasks.get(task_id)
        return task if task is not None and task.owner == owner else None

    def in_flight(self, owner: str | None = None) -> list[Task]:
        with self._lock:
            tasks = list(self._tasks.values())
        return [t for t in tasks if not t.done() and (owner is None or t.owner == owner)]

    def discard(self, task: Task) -> None:
        with self._lock:
            self._tasks.pop(task.id, None)

    def _forget_old(self) -> None:
        now = time.time()
        finished = [t for t in self._tasks.values() if t.done()]
        extra = len(finished) - self.keep
        for i, t in enumerate(finished):
            if i < extra or now - t.created > self.ttl:
                del self._tasks[t.id]
