"""The step-level core: one worker thread owns the model; requests join and leave between steps.

    submit(Request) -> queue -> worker, at every step boundary:
        expire  cancelled and timed-out requests (queued or running)
        admit   queued requests, FIFO, while their rows and LoRA slots fit
        plan    new requests only: text, learned tokens, every attn2 K/V, image tokens' K'/V' (engine/plan.py)
        step    ONE UNet forward over every row of one latent-size group, per-row timesteps
        blend   every request's branches (one fused op), then each request's own scheduler.step
        retire  finished requests: decode, resolve their Jobs

Everything one request raises (while planning, stepping its scheduler, decoding) becomes that
request's error; a failing shared forward is retried request by request, so only the request
that fails alone fails. The worker never dies of a request.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from . import images as image_io
from . import schedulers
from .api import GenerationOutput
from .errors import (
    EngineBusyError,
    EngineClosedError,
    ImpastoError,
    NumericalError,
    RequestCancelledError,
    RequestError,
    RequestFailedError,
    RequestTimeoutError,
)
from .guidance import BranchLayout, blend, branch_table
from .plan import Branch, build_plan


class JobResult:
    """The waiting half of a job, shared by the local Job and the serve backends' remote jobs:
    a Future the owner resolves once with the request's GenerationOutput."""

    label = "request"  # how timeout errors name the job

    def __init__(self):
        self._future: Future = Future()

    def done(self) -> bool:
        return self._future.done()

    def output(self, timeout=None) -> GenerationOutput:
        """The GenerationOutput, failed or not (its `.error` set instead of raised)."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise TimeoutError(f"{self.label} is not done after {timeout} s") from None

    def result(self, timeout=None) -> GenerationOutput:
        out = self.output(timeout)
        if out.error is not None:
            raise out.error
        return out

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def _resolve(self, out: GenerationOutput) -> None:
        if not self._future.done():
            self._future.set_result(out)


class Job(JobResult):
    """A submitted request: a handle any thread can wait on, poll or cancel.

    `result(timeout)` returns the GenerationOutput or raises the request's error (as `generate`
    does); `done()`; `cancel()` (takes effect at the next step boundary); `progress` is
    (steps_done, steps_total); `add_done_callback(fn)` calls fn(job) once done, on the worker
    thread (or at once if already done).
    """

    def __init__(self, request, index: int = 0):
        super().__init__()
        self.request = request
        self.index = index
        self.label = f"request {index}"
        self._cancel = threading.Event()
        self._steps_done = 0
        self._steps_total = None  # the scheduler's forwards, once planned (img2img starts later)

    @property
    def progress(self) -> tuple[int, int]:
        return self._steps_done, self._steps_total or getattr(self.request, "steps", 0)

    def cancel(self) -> bool:
        """Ask the worker to drop this request at its next step boundary; False if already done."""
        if self.done():
            return False
        self._cancel.set()
        return True

    def cancelled(self) -> bool:
        return self.done() and isinstance(self._future.result().error, RequestCancelledError)


class _Queued:
    """A validated request waiting for admission."""

    def __init__(self, job: Job, prep, ctx, key: tuple, t_submit: float):
        self.job, self.prep, self.ctx, self.key, self.t_submit = job, prep, ctx, key, t_submit
        timeout = prep.request.timeout
        self.deadline = None if timeout is None else t_submit + timeout


class _Running:
    """One admitted request: its plan rows, scheduler, latents and pins."""

    serial = itertools.count()

    def __init__(self, q: _Queued):
        self.q, self.job, self.prep, self.ctx, self.key = q, q.job, q.prep, q.ctx, q.key
        self.id = next(self.serial)  # identifies layouts; never reused, unlike id()
        self.pins = contextlib.ExitStack()
        self.out = GenerationOutput(seed=q.prep.seed, warnings=list(q.prep.warnings),
                                    seeds=list(q.prep.seeds or [q.prep.seed] * q.prep.request.num_images))
        self.i = 0
        self.timesteps = None  # set once planned
        self.schedule = None  # a _Schedule when some adapter has start/end
        self.lora_key = ()  # the LoRAs its rows name (_load)
        self.bar = None
        self.t_admit = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.timesteps is not None and self.i >= len(self.timesteps)


class _Schedule:
    """A request's step-scheduled adapters (Adapter start/end): their K/V deltas kept apart from
    the K/V planned with all of them off, and the gate of each at every step.

    Semantics: with K_off the planned K (likewise V) with every scheduled adapter at scale 0 and
    K_a the one with only adapter a on, ΔK_a = K_a − K_off; in step i of n the rows read
    K_off + Σ_{a active at i} ΔK_a, and the LoRA row tables give each inactive adapter scale 0.
    K is linear in each adapter's contribution (its LoRA on to_k, its kv delta; its tokens are
    in every variant), so this equals planning the active set alone. The batch state is
    rewritten in place only at the steps where some adapter turns on or off.
    """

    def __init__(self, adapters, plan, variants, *, branches: int, n: int, L: int):
        """variants: where, in the plan's branch list, the request's branches with every
        scheduled adapter off start, then those with only adapter a on (in `adapters` order);
        each holds the request's `branches` branches, n rows (images) each."""
        self.adapters = list(adapters)
        self._cached = {}

        def take(v0):
            idx = torch.tensor([plan.index[v0 + j] for j in range(branches) for _ in range(n)], device=plan.embeds.device)
            return {name: (k[idx, :L], v[idx, :L]) for name, (k, v) in plan.kv.items()}

        self._kv_off = take(variants[0])
        self._dkv = []
        for v0 in variants[1:]:
            on = take(v0)
            self._dkv.append({name: (k - self._kv_off[name][0], v - self._kv_off[name][1]) for name, (k, v) in on.items()})

    def phase(self, i: int, n: int) -> tuple:
        return tuple(a.active(i, n) for a in self.adapters)

    def kv(self, r) -> dict:
        """The rows' K/V in the current step (cached per phase: a request has few)."""
        phase = self.phase(r.i, len(r.timesteps))
        if phase not in self._cached:
            out = dict(self._kv_off)
            for on, d in zip(phase, self._dkv):
                if on:
                    out = {name: (k + d[name][0], v + d[name][1]) for name, (k, v) in out.items()}
            self._cached[phase] = out
        return self._cached[phase]

    def rows(self, r) -> list:
        """The rows' LoRA (name, scale) pairs in the current step: inactive adapters at scale 0
        (kept in the table, so its shape never changes)."""
        phase = dict(zip((a.name for a in self.adapters), self.phase(r.i, len(r.timesteps))))
        return [[(name, w if phase.get(name, True) else 0.0) for name, w in row] for row in r.row_adapters]


class Worker:
    """The thread that owns the engine's model and batch state (see the module docstring)."""

    def __init__(self, engine, *, max_batch_rows: int, max_queue: int):
        self.e = engine
        self.max_batch_rows, self.max_queue = max_batch_rows, max_queue
        self.boundary = threading.RLock()  # held while the model and its pools are in use
        self._cv = threading.Condition()
        self._queue: collections.deque[_Queued] = collections.deque()
        self._running: list[_Running] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.forwards, self.rows_last_forward = 0, 0
        self._turn = 0  # iterations run; with _last_step, latent-size groups take turns
        self._last_step: dict[tuple, int] = {}

    # ------------------------------------------------------------------ callers' side
    def submit(self, items: list[_Queued]) -> None:
        """Queue `items` atomically (admitted together when they fit), or raise EngineBusyError."""
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is closed")
            if len(self._queue) + len(items) > self.max_queue:
                raise EngineBusyError(f"the queue holds {len(self._queue)} requests, max_queue={self.max_queue}")
            self._queue.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="impasto-worker", daemon=True)
                self._thread.start()
            self._cv.notify()

    def stats(self) -> dict:
        """queued / running requests now, UNet forwards so far and the rows of the last one."""
        with self._cv:
            queued = len(self._queue)
        return {"queued": queued, "running": len(self._running), "forwards": self.forwards,
                "rows_last_forward": self.rows_last_forward, "alive": self._thread is None or self._thread.is_alive()}

    def is_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        """Stop the worker after its current step; queued and running requests end with
        EngineClosedError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and not self.is_worker_thread():
            self._thread.join()
        with self.boundary:
            self._drain(EngineClosedError("the engine was closed before this request finished"))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and not self._running:
                    self._cv.wait()
                if self._closed:
                    return
            try:
                with self.boundary:
                    self._iteration()
            except BaseException as e:  # noqa: BLE001 - a bug here fails what is running, not the worker
                for r in list(self._running):
                    self._fail(r, e, "serving")

    def _drain(self, error: BaseException) -> None:
        with self._cv:
            queued, self._queue = list(self._queue), collections.deque()
        for q in queued:
            self._fail_queued(q, error)
        for r in list(self._running):
            self._fail(r, error, "serving")

    def _iteration(self) -> None:
        now = time.perf_counter()
        self._expire(now)
        self._admit()
        groups = list(dict.fromkeys(r.key for r in self._running if r.timesteps is not None))
        if groups:  # latent sizes take turns: the group stepped least recently goes (ties: oldest)
            key = min(groups, key=lambda k: self._last_step.get(k, -1))
            self._turn += 1
            self._last_step[key] = self._turn
            self._step(_adjacent_by_lora([r for r in self._running if r.key == key and r.timesteps is not None]))
        for r in [r for r in self._running if r.finished]:
            self._retire(r)
        live = {r.key for r in self._running}
        self._last_step = {k: v for k, v in self._last_step.items() if k in live}

    # ------------------------------------------------------------------ expire, admit
    def _expire(self, now: float) -> None:
        with self._cv:
            gone = [q for q in self._queue if q.job._cancel.is_set() or (q.deadline is not None and now > q.deadline)]
            for q in gone:
                self._queue.remove(q)
        for q in gone:
            self._fail_queued(q, self._why_stopped(q.job, q.prep))
        for r in list(self._running):
            if r.job._cancel.is_set() or (r.q.deadline is not None and now > r.q.deadline):
                self._fail(r, self._why_stopped(r.job, r.prep), "serving")

    @staticmethod
    def _why_stopped(job: Job, prep) -> ImpastoError:
        if job._cancel.is_set():
            return RequestCancelledError(f"request {job.index} was cancelled")
        return RequestTimeoutError(f"request {job.index} ran past its timeout of {prep.request.timeout} s")

    def _admit(self) -> None:
        """FIFO: admit the head while it fits; a head that does not fit waits (and so does
        everything behind it: no request is overtaken forever). The requests admitted at one
        boundary are planned together (one text-encoder batch, shared branches planned once)."""
        admitted = []
        while True:
            with self._cv:
                if not self._queue or not self._fits(self._queue[0]):
                    break
                q = self._queue.popleft()
            r = _Running(q)
            self._running.append(r)
            try:
                q.ctx.run(self._load, r)
            except Exception as e:  # noqa: BLE001 - this request's error, the others go on
                self._fail(r, e, "loading adapters")
                continue
            admitted.append(r)
        for key in dict.fromkeys(r.key for r in admitted):
            group = [r for r in admitted if r.key == key]
            try:
                group[0].ctx.run(self._plan, group)
            except Exception as e:  # noqa: BLE001 - find who fails alone
                if len(group) == 1:
                    self._fail(group[0], e, "planning")
                    continue
                for r in group:
                    try:
                        r.ctx.run(self._plan, [r])
                    except Exception as e1:  # noqa: BLE001
                        self._fail(r, e1, "planning")

    def _fits(self, q: _Queued) -> bool:
        rows = sum(r.prep.rows for r in self._running if r.key == q.key)
        if rows + q.prep.rows > self.max_batch_rows:
            return False
        need = self.e.lora_slot_need([q.prep] + [r.prep for r in self._running])
        return all(n <= self.e.lora.S for n in need.values())

    def _load(self, r: _Running) -> None:
        """Pin and read an admitted request's adapters; put its LoRAs into their slots (the
        step's tables need them)."""
        e = self.e
        names = r.prep.adapter_names()
        r.pins.enter_context(e.adapters.pinned(names))
        r.all_files = {n: e.adapters.load(n) for n in sorted(names)}
        r.branch_rows = [e.adapters.lora_rows(adapters, r.all_files) for _, adapters in r.prep.branches()]
        lora_names = {n for row in r.branch_rows for n, _ in row}
        e.lora.pin(lora_names)
        r.pins.callback(e.lora.unpin, lora_names)
        for n in sorted(lora_names):
            e.lora.load(n, r.all_files[n], pinned=lora_names)
        r.files = {n: r.all_files[n] for n in lora_names}
        r.lora_key = tuple(tuple(n for n, _ in row) for row in r.branch_rows)
        for a in r.prep.scheduled:
            if e.adapters.family(a.name).text_encoder_lora(r.all_files[a.name]) is not None:
                raise RequestError(f"adapters: {a.name!r} takes no start/end: it has text-encoder layers, whose "
                                   f"effect is computed once before the first step")

    def _plan(self, group: list[_Running]) -> None:
        """Plan `group` together: every distinct branch once (text, tokens, attn2 K/V); then
        each request's rows, scheduler and initial latents."""
        e = self.e
        t_plan = time.perf_counter()
        branches, first, variants, specs = [], [], [], []
        for r in group:
            first.append(len(branches))
            branches += r.prep.branches()
            # step-scheduled adapters: the K/V with all of them off, and with each one alone on,
            # planned beside the request's own branches (their differences: each one's K/V delta)
            names = [a.name for a in r.prep.scheduled]
            offs = [frozenset(names)] + [frozenset(names) - {n} for n in names] if names else []
            variants.append([])
            for off in offs:
                variants[-1].append(len(branches))
                branches += r.prep.branches(off)
            specs += [(r.prep.chunks, r.prep.clip_skip, r.prep.syntax == "a1111")] * (len(branches) - len(specs))
        files = {n: f for r in group for n, f in r.all_files.items()}
        plan = build_plan([Branch(text, adapters, *spec) for (text, adapters), spec in zip(branches, specs)], e.base,
                          e.attn2, e.lora, e.adapters, files, e.device, e.dtype, e.te_lora)
        t_plan = time.perf_counter() - t_plan
        for r, b0, variant in zip(group, first, variants):
            n, branches = r.prep.request.num_images, len(r.branch_rows)  # one LoRA row per branch (_load)
            row_branch = torch.tensor([plan.index[b0 + b] for b in range(branches) for _ in range(n)], device=e.device)
            L = plan.lengths[plan.index[b0]]  # every branch of a request has its chunks (engine/prompts.py)
            r.embeds = plan.embeds[row_branch, :L]
            r.kv = {name: (k[row_branch, :L], v[row_branch, :L]) for name, (k, v) in plan.kv.items()}
            if r.prep.scheduled:
                r.schedule = _Schedule(r.prep.scheduled, plan, variant, branches=branches, n=n, L=L)
            r.images = [plan.image[plan.index[b0 + b]] if plan.image else None for b in range(branches) for _ in range(n)]
            r.row_adapters = [row for row in r.branch_rows for _ in range(n)]
            r.rows, r.n, r.branches = len(r.row_adapters), n, branches
            self._setup(r)
            r.out.timings["plan"] = t_plan

    def _setup(self, r: _Running) -> None:
        """A request's own scheduler instance (its sampler) and initial latents, seeded as
        diffusers seeds them: one generator, or one per image (`seeds`); img2img starts at the
        strength's timestep from the encoded, noised image (StableDiffusionImg2ImgPipeline);
        inpainting as StableDiffusionInpaintPipeline (engine/images.py `start_inpainting`)."""
        e, prep, base, req = self.e, r.prep, self.e.base, r.prep.request
        r.scheduler = schedulers.build(req.scheduler, base.scheduler.config, base.scheduler)
        r.scheduler.set_timesteps(req.steps, device=e.device)
        r.timesteps = r.scheduler.timesteps
        shape = (base.vae.config.latent_channels, prep.height // base.vae_scale_factor,
                 prep.width // base.vae_scale_factor)
        if prep.seeds is not None:
            gens = [torch.Generator("cpu").manual_seed(s) for s in prep.seeds]
        else:
            gens = torch.Generator("cpu").manual_seed(prep.seed)
        r.inpainting = None
        inpaint = prep.mask is not None or base.inpainting  # an inpainting base: every request (mask all ones)
        if prep.init is not None or inpaint:
            t_start = req.steps - min(int(req.steps * prep.strength), req.steps)
            r.timesteps = r.timesteps[t_start * r.scheduler.order:]
            if hasattr(r.scheduler, "set_begin_index"):
                r.scheduler.set_begin_index(t_start * r.scheduler.order)
        if inpaint:  # StableDiffusionInpaintPipeline; a text-only request repaints a blank image everywhere (A1111)
            init = prep.init if prep.init is not None else torch.zeros(1, 3, prep.height, prep.width)
            mask = prep.mask if prep.mask is not None else torch.ones(1, 1, prep.height, prep.width)
            r.latents, r.inpainting = image_io.start_inpainting(
                base.vae, r.scheduler, init, mask, gens, r.n, shape, r.timesteps[:1], prep.strength,
                base.inpainting, e.device, e.dtype)
        elif prep.init is not None:
            z0 = image_io.encode(base.vae, prep.init.to(e.device, e.dtype), gens, r.n)
            noise = randn_tensor(z0.shape, generator=gens, device=e.device, dtype=e.dtype)
            r.latents = r.scheduler.add_noise(z0, noise, r.timesteps[:1].repeat(r.n))
        else:
            r.latents = randn_tensor((r.n, *shape), generator=gens, device=e.device, dtype=e.dtype)
            r.latents = r.latents * r.scheduler.init_noise_sigma
        r.step_kwargs = _step_kwargs(r.scheduler, gens if isinstance(gens, list) else [gens] * r.n)
        r.job._steps_total = len(r.timesteps)
        g = prep.guidance
        r.layout = (r.n, g.cfg, prep.has_uncond, tuple(float(w) for w in g.styles.values()), g.rescale)
        if e.progress:
            r.bar = tqdm(total=len(r.timesteps), desc=f"request {r.job.index}", leave=False)
        r.out.timings["queued"] = r.t_admit - r.q.t_submit
        r.t_denoise = time.perf_counter()

    # ------------------------------------------------------------------ step
    def _step(self, group: list[_Running]) -> None:
        """One shared forward for `group`; if it raises, each request is retried alone so that
        only the one that fails alone fails. Then each request's own scheduler step."""
        try:
            done = [(group, group[0].ctx.run(self._forward, group))]
        except Exception as e:  # noqa: BLE001
            self.e.state.owner = None
            if len(group) == 1:
                self._fail(group[0], e, "denoising")
                return
            done = []
            for r in group:
                try:
                    done.append(([r], r.ctx.run(self._forward, [r])))
                except Exception as e1:  # noqa: BLE001
                    self._fail(r, e1, "denoising")
            self.e.state.owner = None
        for members, noise in done:
            j = 0
            for r in members:
                try:
                    r.ctx.run(self._advance, r, noise[j : j + r.n])
                except Exception as e:  # noqa: BLE001
                    self._fail(r, e, "scheduler step")
                j += r.n

    def _write_layout(self, group: list[_Running]) -> None:
        """Rewrite the batch state for `group` (only when its members changed)."""
        e, state = self.e, self.e.state
        # a step-scheduled adapter turning on or off changes the phase: rewrite in place
        owner = tuple((r.id, r.schedule.phase(r.i, len(r.timesteps)) if r.schedule else ()) for r in group)
        if state.owner == owner:
            return
        state.owner = None
        state.write_layout([(r.embeds, r.schedule.kv(r) if r.schedule else r.kv) for r in group])
        state.write_images([x for r in group for x in r.images])
        files = {n: f for r in group for n, f in r.files.items()}
        rows = [row for r in group for row in (r.schedule.rows(r) if r.schedule else r.row_adapters)]
        e.lora.set_tables(e.lora.tables(rows, files), len(rows))
        layouts, start = [], 0
        for r in group:
            n, cfg, has_uncond, weights, rescale = r.layout
            layouts.append(BranchLayout(start, n, cfg, has_uncond, weights, rescale))
            start += r.rows
        self._table = branch_table(layouts, e.device)
        state.owner = owner

    def _forward(self, group: list[_Running]) -> torch.Tensor:
        """Semantics: the guided noise of every latent of `group`, Shape [sum n, C, h, w], from
        ONE UNet forward over all their rows, each row at its own request's timestep."""
        e = self.e
        self._write_layout(group)
        inputs, steps = [], []
        for r in group:
            t = r.timesteps[r.i]
            x = r.scheduler.scale_model_input(r.latents, t)
            if r.inpainting is not None and r.inpainting.concat is not None:  # inpainting UNet: + mask, image
                x = torch.cat([x, r.inpainting.concat], 1)
            inputs.append(x.repeat(r.branches, *([1] * (x.dim() - 1))))
            steps.append(t.reshape(1).expand(r.rows))
        with torch.inference_mode():
            e.state.planned = True
            try:
                noise = e.unet(torch.cat(inputs), torch.cat(steps), encoder_hidden_states=e.state.embeds,
                               return_dict=False)[0]
            finally:
                e.state.planned = False
            self.forwards += 1
            self.rows_last_forward = e.state.rows
            return blend(noise, self._table)

    def _advance(self, r: _Running, noise: torch.Tensor) -> None:
        with torch.inference_mode():
            t = r.timesteps[r.i]
            r.latents = r.scheduler.step(noise, t, r.latents, **r.step_kwargs, return_dict=False)[0]
            if r.inpainting is not None and r.inpainting.image is not None:  # regular UNet: keep what is known
                r.latents = image_io.blend_known(r.scheduler, r.inpainting, r.latents, r.timesteps, r.i)
        r.i += 1
        r.job._steps_done = r.i
        if r.bar is not None:
            r.bar.update(1)
        callback = r.prep.request.callback
        if callback is not None:
            try:
                preview = None
                if r.prep.request.preview:
                    preview = image_io.latent_preview(r.latents, self.e.base.vae.config.scaling_factor,
                                                      self.e.preview_map())
                callback(r.i, len(r.timesteps), preview)
            except Exception as e:  # noqa: BLE001 - the caller's callback fails its own request only
                raise _request_error(r.job, e, "callback") from e

    # ------------------------------------------------------------------ retire
    def _retire(self, r: _Running) -> None:
        t_decode = time.perf_counter()
        r.out.timings["denoise"] = t_decode - r.t_denoise
        try:
            r.out.images = r.ctx.run(self._decode, r)
        except Exception as e:  # noqa: BLE001
            self._fail(r, e, "decoding")
            return
        r.out.timings["decode"] = time.perf_counter() - t_decode
        self._finish(r)

    def _decode(self, r: _Running):
        if not bool(torch.isfinite(r.latents).all()):
            raise NumericalError(f"request {r.job.index}: the final latents hold NaN or Inf "
                                 f"(adapter scales, guidance or the model diverged)")
        e, n = self.e, r.n
        if r.prep.request.output_type == "latent":
            return r.latents.clone()
        with torch.inference_mode():
            pixels = e.base.vae.decode(r.latents / e.base.vae.config.scaling_factor, return_dict=False)[0]
        return e.image_processor.postprocess(pixels, output_type=r.prep.request.output_type, do_denormalize=[True] * n)

    def _fail(self, r: _Running, error: BaseException, stage: str) -> None:
        r.out.images = None
        r.out.error = _request_error(r.job, error, stage)
        self._finish(r)

    def _finish(self, r: _Running) -> None:
        if r in self._running:
            self._running.remove(r)
        if self.e.state.owner is not None and r.id in [o[0] for o in self.e.state.owner]:
            self.e.state.owner = None
        r.pins.close()
        if r.bar is not None:
            r.bar.close()
        r.out.timings["total"] = time.perf_counter() - r.q.t_submit
        r.job._resolve(r.out)

    def _fail_queued(self, q: _Queued, error: BaseException) -> None:
        out = GenerationOutput(error=_request_error(q.job, error, "queue"), seed=q.prep.seed,
                               warnings=list(q.prep.warnings))
        out.timings["total"] = time.perf_counter() - q.t_submit
        q.job._resolve(out)


def _adjacent_by_lora(group: list[_Running]) -> list[_Running]:
    """`group` with requests naming the same LoRAs next to each other (otherwise in admission
    order). The CPU LoRA op runs one matmul pair per run of consecutive rows sharing a slot
    (kernels/lora.py `_segments`), so two requests for one adapter cost one pair, not two. The
    order is a function of the members alone, so the layout is not rewritten while they stay."""
    first: dict[tuple, int] = {}
    for r in group:
        first.setdefault(r.lora_key, len(first))
    return sorted(group, key=lambda r: first[r.lora_key])


def _request_error(job: Job, error: BaseException, stage: str) -> ImpastoError:
    """impasto's own errors stay as they are; anything else is wrapped, naming the request."""
    if isinstance(error, ImpastoError):
        return error
    prompt = getattr(job.request, "prompt", "")
    wrapped = RequestFailedError(f"request {job.index} ({str(prompt)[:40]!r}): {stage} failed: "
                                 f"{type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped


def _step_kwargs(scheduler, generators) -> dict:
    """diffusers' prepare_extra_step_kwargs: eta=0 where accepted; one generator per latent
    (the request's own) for schedulers that draw noise."""
    params = set(inspect.signature(scheduler.step).parameters)
    kw = {}
    if "eta" in params:
        kw["eta"] = 0.0
    if "generator" in params:
        kw["generator"] = generators
    return kw
