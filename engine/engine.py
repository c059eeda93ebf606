"""The engine: construction, the public API and request validation.

`submit` validates a request on the caller's thread (raising at once for one that can never
run) and queues it; one worker thread (engine/worker.py) owns the model and serves every
request in flight, step by step: requests with different prompts, adapters, guidance and step
counts share each UNet forward, and join or leave it between steps. `generate` and
`generate_batch` are thin wrappers over `submit`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from diffusers.image_processor import VaeImageProcessor

from impasto.kernels import dispatch

from . import schedulers, tiny
from .adapters.lora import LoraRuntime, attention_targets, runtime_buckets, slots_for_budget
from .adapters.store import AdapterStore
from .api import (
    Adapter,
    GenerationOutput,
    Guidance,
    Request,
    normalize_adapters,
    normalize_guidance,
    normalize_images,
    validate_request,
)
from .attention import cross_attention_layers, install_planned_attention, uninstall_planned_attention
from .batch import BatchState
from .guidance import split_style_windows
from . import images as image_io
from .errors import AdapterError, AdapterNameError, ImpastoError, RequestError
from .loading import BaseModel, load_base_model
from .plan import PLACEHOLDER
from .worker import Job, Worker, _Queued

# Operator limits (Engine keywords), checked at submit before anything is allocated.
LIMITS = dict(
    max_pixels=2048 * 2048,  # height * width of one image
    max_steps=200,  # also never more than the scheduler's training timesteps
    max_num_images=8,
    max_batch_rows=64,  # rows of one UNet forward (a request's rows: images x branches)
    max_styles=4,
    max_queue=1024,  # requests waiting for admission; beyond it submit raises EngineBusyError
    max_prompt_chunks=3,  # 77-token chunks of a prompt (A1111 chunking, engine/prompts.py): 225 tokens
)


@dataclass
class Prepared:
    """One validated request, as the worker serves it."""

    index: int
    request: Request
    guidance: Guidance
    adapters: list
    height: int
    width: int
    seed: int
    styles: tuple = ()  # ((style adapter name, suffix or None), ...) in Guidance.styles order
    prompt: str = ""  # the texts actually encoded (cut to the character bound)
    negative_prompt: str = ""
    warnings: list = field(default_factory=list)
    uncond_key: tuple | None = None  # the uncond branch's adapters where a family's differ there (encoder)
    seeds: list | None = None  # one per image, when the request gave them
    init: object = None  # img2img: the init image, float32 [1, 3, height, width] in [-1, 1]
    clip_skip: int = 1
    syntax: str = "plain"
    chunks: int = 1  # 77-token chunks every branch is encoded to: the longest branch's, capped
    mask: object = None  # inpainting: float32 [1, 1, height, width] in {0, 1}, 1 = repaint
    strength: float = 1.0  # img2img / inpainting: the part of the schedule run (1.0 without an image)
    style_windows: tuple = ()  # Adapter(style name, 1.0, start=, end=) per step-scheduled style

    @property
    def has_uncond(self) -> bool:
        return self.guidance.cfg > 1.0

    @property
    def rows(self) -> int:
        """UNet rows of this request: one per (branch, image)."""
        return self.request.num_images * (1 + int(self.has_uncond) + len(self.styles))

    def adapter_names(self) -> set[str]:
        """Every adapter the request uses: its own and its styles'."""
        return {a.name for a in self.adapters} | {name for name, _ in self.styles}

    def adapter_key(self, off=frozenset()) -> tuple:
        """The request's adapters as a hashable ((name, scale, options), ...), applied to every
        branch; those in `off` at scale 0 (how a step-scheduled adapter's K/V delta is planned)."""
        return tuple((a.name, 0.0 if a.name in off else float(a.scale), tuple(sorted(a.options.items())))
                     for a in self.adapters)

    @property
    def scheduled(self) -> list:
        """The adapters active over only part of the schedule (Adapter start/end), then the
        scheduled styles (their LoRA, at scale 1 in their own branch while active)."""
        return [a for a in self.adapters if a.scheduled] + list(self.style_windows)

    def branches(self, off=frozenset()) -> list[tuple[str, tuple]]:
        """(text, adapters) per branch: [uncond], cond, then one per style, whose text gets the
        style's suffix and whose adapters add the style LoRA at scale 1. `off`: adapter_key's."""
        base = self.adapter_key(off)
        uncond = base if self.uncond_key is None else tuple(
            (n, 0.0 if n in off else s, o) for n, s, o in self.uncond_key)
        out = ([(self.negative_prompt, uncond)] if self.has_uncond else []) + [(self.prompt, base)]
        for name, suffix in self.styles:
            text = self.prompt + (" " + suffix if suffix else "")
            out.append((text, base + ((name, 0.0 if name in off else 1.0, ()),)))
        return out


class Engine:
    """A frozen base model serving requests, each with its own adapters and guidance.

    Thread-safe: any thread may call `submit`, `generate`, `generate_batch`, `agenerate` and
    register or unregister adapters; one worker thread runs the model. `close()` stops it.
    """

    def __init__(
        self,
        base: BaseModel,
        *,
        device,
        dtype,
        adapter_root=None,
        host_cache_bytes=None,
        device_pool_bytes=None,
        max_rank: int = 64,
        max_adapters_per_row: int = 4,
        slots_per_bucket: int = 16,
        progress: bool = False,
        compile=False,
        prompt_syntax: str = "plain",
        **limits,
    ):
        """compile: False, True (torch.compile's default backend) or a backend name such as
        "aot_eager". The UNet forward is compiled once per batch shape, and the LoRA pools switch
        to the fixed mode (attention projections, one bucket padded to max_rank), so swapping
        adapters never recompiles. device_pool_bytes, when given, sets the slots per bucket to
        what fits the budget (overriding slots_per_bucket). limits: the operator limits of
        `LIMITS` (max_pixels, max_steps, max_num_images, max_batch_rows, max_styles, max_queue,
        max_prompt_chunks), each a positive integer. prompt_syntax: "plain" (diffusers: the prompt
        is text) or "a1111" (A1111 emphasis, BREAK and `<lora:NAME:W>` tags, engine/prompts.py),
        the default of requests that do not set their own."""
        unknown = set(limits) - set(LIMITS)
        if unknown:
            raise TypeError(f"Engine: unknown keyword(s) {sorted(unknown)}; limits are {sorted(LIMITS)}")
        self.limits = {**LIMITS, **limits}
        for name, v in self.limits.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if prompt_syntax not in ("plain", "a1111"):
            raise ValueError(f"prompt_syntax: expected 'plain' or 'a1111', got {prompt_syntax!r}")
        self.prompt_syntax = prompt_syntax
        self._preview_map = None  # latent -> RGB map, fitted on first use (engine/images.py)
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rank = max_rank
        self.max_adapters_per_row = max_adapters_per_row
        self.progress = progress
        self.image_processor = VaeImageProcessor(vae_scale_factor=base.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(vae_scale_factor=base.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        fixed = attention_targets(base.unet) if compile else None
        self.adapters = AdapterStore(
            base.unet,
            text_encoder=base.text_encoder,
            root=adapter_root,
            host_cache_bytes=host_cache_bytes,
            device_pool_bytes=device_pool_bytes,
            max_rank=max_rank,
            dtype=dtype,
            model_dir=base.path,
            targets=fixed,
        )
        if device_pool_bytes is not None:
            buckets = runtime_buckets(max_rank, fixed is not None)
            targets = [self.adapters.targets, self.adapters.te_targets]
            slots_per_bucket = slots_for_budget(device_pool_bytes, targets, buckets, dtype)
        tokens = base.tokenizer.model_max_length
        self.state = BatchState(cross_attention_layers(base.unet), max_rows=self.limits["max_batch_rows"],
                                max_len=tokens * self.limits["max_prompt_chunks"],
                                embed_dim=base.text_encoder.config.hidden_size, device=self.device, dtype=dtype)
        self.attn2 = install_planned_attention(base.unet, self.state)
        runtime = functools.partial(LoraRuntime, slots_per_bucket=slots_per_bucket, max_rank=max_rank,
                                    max_adapters_per_row=max_adapters_per_row, device=self.device, dtype=dtype,
                                    state=self.state)
        self.lora = runtime(base.unet, fixed_targets=fixed, key="unet")
        self.te_lora = runtime(base.text_encoder, key="text_encoder")
        self.adapters.runtimes = (self.lora, self.te_lora)
        self.adapters.tokenizer = base.tokenizer
        self.unet = base.unet
        if compile:
            self.unet = torch.compile(base.unet, backend="inductor" if compile is True else compile, dynamic=False)
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="impasto-prefetch")
        self._worker = Worker(self, max_batch_rows=self.limits["max_batch_rows"], max_queue=self.limits["max_queue"])
        self.adapters.boundary = self._worker.boundary  # (un)registering waits for a step boundary
        # UNet downsamples by 2 per down block but the last; latents must divide evenly.
        self._size_multiple = base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
        # A prompt within the token budget is never cut: no token is longer than the longest
        # vocabulary entry (plus its separating space).
        longest = max((len(t.replace("</w>", "")) for t in base.tokenizer.get_vocab()), default=16)
        self._max_prompt_chars = (tokens - 2) * self.limits["max_prompt_chunks"] * (longest + 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str = "tiny",
        *,
        device=None,
        dtype=None,
        scheduler=None,
        config=None,
        **kwargs,
    ) -> "Engine":
        """Load a local diffusers SD-layout folder, an original-layout SD 1.x single-file
        checkpoint ("model.safetensors", A1111 / ComfyUI; `config`: a diffusers folder whose
        configs describe it, default SD 1.5's shipped with impasto), or "tiny" (the miniature model
        shipped with impasto). No network, ever; a missing or malformed component raises ModelLoadError.
        Other keywords are the constructor's (adapter_root, host_cache_bytes, device_pool_bytes,
        max_rank, max_adapters_per_row, slots_per_bucket, progress, compile, and the limits)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.float16
        path = path_or_name
        if path_or_name == "tiny":
            path, trained = tiny.tiny_model_dir()
            if not trained:
                tiny.warn_random()
        base = load_base_model(path, device=device, dtype=dtype, scheduler=scheduler, config=config)
        return cls(base, device=device, dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ public API
    def submit(self, request: Request) -> Job:
        """Queue one request; returns its Job at once. Callable from any thread.

        Raises at once (RequestError, AdapterError, EngineBusyError, EngineClosedError) for a
        request that can never run; every later failure resolves the Job with its error."""
        return self._submit([request], raise_errors=True)[0]

    def generate(
        self,
        prompt: str,
        *,
        adapters=(),
        guidance=7.5,
        negative_prompt=None,
        steps=30,
        seed=None,
        height=None,
        width=None,
        num_images=1,
        output_type="pil",
        timeout=None,
        ip_adapter_image=None,
        **usage,
    ) -> GenerationOutput:
        """Generate images for one prompt; raises the request's error instead of returning it.
        ip_adapter_image: the reference image(s) of the request's encoder adapter (PIL or bytes).
        `usage`: the other Request fields (scheduler, seeds, image / init_image, mask_image, strength,
        clip_skip, prompt_syntax, callback, preview)."""
        req = Request(prompt, adapters=adapters, guidance=guidance, negative_prompt=negative_prompt, steps=steps,
                      seed=seed, height=height, width=width, num_images=num_images, output_type=output_type,
                      timeout=timeout, ip_adapter_image=ip_adapter_image, **usage)
        self._not_on_worker("generate")
        return self.submit(req).result()

    async def agenerate(self, prompt: str, **kwargs) -> GenerationOutput:
        """`generate` for asyncio code: awaits the Job without blocking the event loop; a
        cancelled task cancels its request."""
        job = self.submit(Request(prompt, **kwargs))
        try:
            out = await asyncio.wrap_future(job._future)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if out.error is not None:
            raise out.error
        return out

    def generate_batch(self, requests) -> list[GenerationOutput]:
        """Serve many requests; outputs in request order. A failed request gets `.error` and the
        others are still served. All are queued at once, so those that fit start together and
        share every UNet forward."""
        self._not_on_worker("generate_batch")
        return [job.output() for job in self._submit(list(requests), raise_errors=False)]

    def warm(self, name: str, *, wait: float = 0.0) -> bool:
        """Semantics: read adapter `name` into the host cache (raises its AdapterError) and,
        if the worker reaches a step boundary within `wait` seconds, copy its UNet LoRA layers
        into a free (or least recently used, unpinned) slot, as admission would. True when it
        is resident in the slot pool afterwards; False leaves the copy to its request's
        admission. Never waits longer than `wait` for the worker."""
        file = self.adapters.load(name)
        names = {n for n, _ in self.adapters.family(name).lora_rows(name, 1.0, file)}
        if not names or not self._worker.boundary.acquire(timeout=wait):
            return False
        try:
            for n in sorted(names):
                self.lora.load(n, file, pinned=names)
            return True
        except AdapterError:  # every slot pinned by running requests
            return False
        finally:
            self._worker.boundary.release()

    def stats(self) -> dict:
        """The worker's counters: queued and running requests, UNet forwards so far, rows of the
        last forward, whether the worker is alive (for /ready and /metrics)."""
        return self._worker.stats()

    def close(self) -> None:
        """Stop the worker (requests still in flight end with EngineClosedError) and remove every
        hook and processor: afterwards the UNet computes exactly what plain diffusers does."""
        self._worker.close()
        self._prefetch.shutdown(wait=True)
        with self._worker.boundary:
            self.lora.close()
            self.te_lora.close()
            uninstall_planned_attention(self.attn2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ internals
    def _not_on_worker(self, what: str) -> None:
        if self._worker.is_worker_thread():
            raise RuntimeError(f"{what} called on the engine's worker thread (from a done callback?): it would "
                               f"wait for itself; use engine.submit there")

    def _submit(self, requests: list, *, raise_errors: bool) -> list[Job]:
        """Validate every request on the caller's thread, then queue the valid ones at once."""
        now = time.perf_counter()
        jobs, items = [], []
        backend = dispatch.context_backend()
        for i, req in enumerate(requests):
            job = Job(req, i)
            jobs.append(job)
            try:
                prep = self._prepare(i, req)
            except ImpastoError as e:
                if raise_errors:
                    raise
                job._resolve(GenerationOutput(error=e, seed=getattr(req, "seed", None)))
                continue
            except Exception as e:  # noqa: BLE001 - a malformed field that slipped past the checks
                err = RequestError(f"requests[{i}]: invalid request: {type(e).__name__}: {e}")
                if raise_errors:
                    raise err from e
                job._resolve(GenerationOutput(error=err, seed=getattr(req, "seed", None)))
                continue
            # copy_context: the caller's use_backend() override reaches the worker
            items.append(_Queued(job, prep, contextvars.copy_context(), (prep.height, prep.width, backend), now))
        if items:
            try:
                self._worker.submit(items)
            except ImpastoError as e:  # busy or closed: every request of the call gets it
                if raise_errors:
                    raise
                for q in items:
                    q.job._resolve(GenerationOutput(error=e, seed=q.prep.seed))
                return jobs
            self._prefetch.submit(self._prefetch_adapters, set().union(*(q.prep.adapter_names() for q in items)))
        return jobs

    def _check_last_timestep(self, scheduler, steps: int, train_steps: int) -> None:
        """A RequestError where `steps` of this request's scheduler reach a timestep the base was
        not trained on: "leading" spacing with steps_offset 1 gives timestep 1000 at 1000 steps,
        which DDIM-like schedulers index out of range in their first step."""
        sched = schedulers.build(scheduler, self.base.scheduler.config, self.base.scheduler)
        sched.set_timesteps(steps)
        top = int(sched.timesteps.max())
        if top < train_steps:
            return
        most = steps - 1
        while most > 1:
            sched.set_timesteps(most)
            if int(sched.timesteps.max()) < train_steps:
                break
            most -= 1
        cfg = sched.config
        raise RequestError(f"steps: {steps} steps of {type(sched).__name__} ({cfg.get('timestep_spacing')!r} spacing, "
                           f"steps_offset {cfg.get('steps_offset', 0)}) reach timestep {top}, past the base's last "
                           f"training timestep {train_steps - 1}; use at most {most} steps")

    def _prepare(self, index: int, req: Request) -> Prepared:
        if not isinstance(req, Request):
            raise RequestError(f"requests[{index}]: expected impasto.Request, got {type(req).__name__}")
        validate_request(req)
        lim = self.limits
        guidance, style_windows = split_style_windows(req.guidance)  # styles with start/end
        guidance = normalize_guidance(guidance)
        adapters = normalize_adapters(req.adapters)
        syntax = req.prompt_syntax or self.prompt_syntax
        prompt_text = req.prompt
        if syntax == "a1111":  # <lora:NAME:W> tags name adapters, after the request's own
            from .prompts import parse_lora_tags

            parsed = parse_lora_tags(req.prompt)
            prompt_text = parsed.prompt
            adapters = adapters + normalize_adapters(list(parsed.adapters))
        per_row = len(adapters) + (1 if guidance.styles else 0)  # a style row adds its style LoRA
        if per_row > self.max_adapters_per_row:
            raise RequestError(
                f"adapters: {len(adapters)} adapters named{' plus a style' if guidance.styles else ''}, "
                f"max_adapters_per_row is {self.max_adapters_per_row}"
            )
        if len(guidance.styles) > lim["max_styles"]:
            raise RequestError(f"guidance.styles: {len(guidance.styles)} styles, max_styles is {lim['max_styles']}")
        train_steps = self.base.scheduler.config.get("num_train_timesteps", 1000)
        if req.steps > min(lim["max_steps"], train_steps):
            which = "max_steps" if lim["max_steps"] < train_steps else "the scheduler's training timesteps"
            raise RequestError(f"steps: {req.steps} is above {which} ({min(lim['max_steps'], train_steps)})")
        if req.steps > train_steps // 2:  # only then can a spacing's steps_offset pass the last timestep
            self._check_last_timestep(req.scheduler, req.steps, train_steps)
        if req.num_images > lim["max_num_images"]:
            raise RequestError(f"num_images: {req.num_images} is above max_num_images ({lim['max_num_images']})")
        default = self.base.unet.config.sample_size * self.base.vae_scale_factor
        init_image = req.image if req.image is not None else req.init_image
        if init_image is not None:  # img2img: the output has the image's size unless asked otherwise
            default_h, default_w = image_io.image_size(init_image, "image")
        else:
            default_h = default_w = default
        height, width = req.height or default_h, req.width or default_w
        if height * width > lim["max_pixels"]:
            raise RequestError(f"height x width: {height}x{width} = {height * width} pixels, max_pixels is "
                               f"{lim['max_pixels']}")
        for name, v in (("height", height), ("width", width)):
            if v % self._size_multiple:
                raise RequestError(f"{name}: {v} is not a multiple of {self._size_multiple} for this model")
        styles = []
        for name in guidance.styles:
            info = self.adapters.info(name)
            if info.family != "style":
                raise AdapterNameError(f"guidance.styles: {name!r} is a {info.family} adapter, not a style adapter")
            styles.append((name, info.suffix))
        adapters = self.adapters.resolve(adapters)
        self._check_schedules(adapters)
        # textual-inversion embeddings apply wherever their token is a word of a prompt (A1111)
        adapters = adapters + self.adapters.implicit((prompt_text, req.negative_prompt or ""), {a.name for a in adapters})
        self._check_adapters(adapters, req, prompt_text)
        adapters, uncond_key = self._attach_images(adapters, req)
        warnings = []
        prompt = self._bound_text("prompt", prompt_text, warnings)
        negative = self._bound_text("negative_prompt", req.negative_prompt or "", warnings)
        seeds = list(req.seeds) if req.seeds is not None else None
        seed = seeds[0] if seeds else req.seed if req.seed is not None else random.SystemRandom().randrange(2**63)
        layers = self.base.text_encoder.config.num_hidden_layers
        clip_skip = req.clip_skip or 1
        if clip_skip > layers:
            raise RequestError(f"clip_skip: {clip_skip} is more than the text encoder's {layers} layers")
        init = mask = None
        strength = 1.0
        if init_image is not None:  # diffusers' defaults: img2img 0.8, inpainting 1.0
            strength = req.strength if req.strength is not None else 1.0 if req.mask_image is not None else 0.8
            if int(req.steps * strength) < 1:
                raise RequestError(f"strength: {strength} x steps {req.steps} leaves no denoising step "
                                   f"(needs strength x steps >= 1)")
            init = image_io.preprocess(self.image_processor, init_image, height, width, "image")
        if req.mask_image is not None:
            mask = image_io.preprocess_mask(self.mask_processor, req.mask_image, height, width, "mask_image")
        prep = Prepared(index, req, guidance, adapters, height, width, seed, tuple(styles), prompt, negative, warnings,
                        uncond_key, seeds, init, clip_skip, syntax, mask=mask, strength=strength,
                        style_windows=style_windows)
        from .prompts import count_chunks

        need = max(count_chunks(self.base.tokenizer, text, set(re.findall(PLACEHOLDER, text)),
                                weighted=syntax == "a1111") for text, _ in prep.branches())
        prep.chunks = min(need, lim["max_prompt_chunks"])
        if prep.rows > lim["max_batch_rows"]:
            raise RequestError(f"num_images x branches: {prep.rows} UNet rows, max_batch_rows is {lim['max_batch_rows']}")
        for bucket, n in self.lora_slot_need([prep]).items():
            if n > self.lora.S:
                raise RequestError(f"adapters: {n} LoRAs of rank bucket {bucket} in one request, the engine has "
                                   f"{self.lora.S} slots per bucket (slots_per_bucket / device_pool_bytes)")
        return prep

    SCHEDULABLE = ("lora", "kv")  # families whose effect is per step: a scale table, a K/V delta

    def _check_schedules(self, adapters) -> None:
        """start/end only where the adapter acts in every step (UNet LoRA, kv); refused for the
        families whose effect is computed once before the first step."""
        for a in adapters:
            family = self.adapters.family(a.name)
            if a.scheduled and family.name not in self.SCHEDULABLE:
                raise RequestError(f"adapters: {a.name!r} ({family.name}) takes no start/end: its effect is computed "
                                   f"once before the first step (step-scheduled: {', '.join(self.SCHEDULABLE)})")

    def _attach_images(self, adapters, req: Request):
        """(adapters with the request's decoded ip_adapter_image given to its encoder adapter as
        the option "image", the uncond branch's adapter key or None); RequestError for an image
        without an encoder adapter, an encoder adapter without an image, or two encoder adapters."""
        images = normalize_images(req.ip_adapter_image, max_pixels=self.limits["max_pixels"])
        readers = [a for a in adapters if self.adapters.family(a.name).image_input]
        if images is None and readers:
            raise RequestError(f"ip_adapter_image: adapter {readers[0].name!r} is an encoder adapter and needs a "
                               f"reference image")
        if images is None:
            return adapters, None
        if not readers:
            raise RequestError("ip_adapter_image: given, but none of this request's adapters is an encoder adapter")
        if len(readers) > 1:
            raise RequestError(f"adapters: {', '.join(repr(a.name) for a in readers)} are all encoder adapters; "
                               f"a request takes one")
        adapters = [Adapter(a.name, a.scale, **a.options, image=images) if a in readers else a for a in adapters]
        uncond = tuple((a.name, float(a.scale), tuple(sorted(self.adapters.family(a.name).uncond_options(a.options).items())))
                       for a in adapters)
        return adapters, uncond

    def _bound_text(self, field_name: str, text: str, warnings: list) -> str:
        """Cut `text` to the character bound before tokenizing, and report any truncation."""
        limit = self._max_prompt_chars
        if len(text) > limit:
            warnings.append(f"{field_name}: cut from {len(text)} to {limit} characters before tokenizing")
            text = text[:limit]
        budget = (self.base.tokenizer.model_max_length - 2) * self.limits["max_prompt_chunks"]
        # a learned-token placeholder is one position (engine/plan.py)
        n = len(self.base.tokenizer(re.sub(PLACEHOLDER, " x ", text), add_special_tokens=False).input_ids)
        if n > budget:
            warnings.append(f"{field_name}: {n} tokens, truncated to the first {budget} "
                            f"(max_prompt_chunks={self.limits['max_prompt_chunks']})")
        return text

    def preview_map(self):
        """The latent -> RGB preview map of this engine's VAE (fitted once, engine/images.py)."""
        if self._preview_map is None:
            self._preview_map = image_io.fit_preview(self.base.vae)
        return self._preview_map

    def lora_slot_need(self, preps) -> dict[int, int]:
        """Distinct LoRA adapters per rank bucket that `preps` need in the slot pools together."""
        need: dict[int, set] = {}
        for prep in preps:
            for name in prep.adapter_names():
                info = self.adapters.info(name)
                if self.adapters.family(name).lora_like and info.targets:
                    need.setdefault(self.lora.bucket(info.rank), set()).add(name)
        return {b: len(names) for b, names in need.items()}

    def _prefetch_adapters(self, names) -> None:
        """Read a queued request's adapters into the host cache before it is admitted; a failure
        is left for that request's own load to report."""
        for name in names:
            try:
                self.adapters.load(name)
            except Exception:  # noqa: BLE001 - reported by the request's own load
                pass

    def _check_adapters(self, adapters, req: Request, prompt: str | None = None) -> None:
        """Every placeholder in a request's prompts is defined by exactly one of its adapters
        (the family rules were checked by `adapters.resolve`)."""
        defined = {}
        for a in adapters:
            info = self.adapters.info(a.name)
            for placeholder, _ in info.token_map:
                if placeholder in defined:
                    raise AdapterNameError(
                        f"adapters: {a.name!r} and {defined[placeholder]!r} both define the placeholder {placeholder!r}"
                    )
                defined[placeholder] = a.name
        prompt = req.prompt if prompt is None else prompt  # the prompt with its <lora:...> tags taken out
        for where, text in (("prompt", prompt), ("negative_prompt", req.negative_prompt or "")):
            for placeholder in re.findall(PLACEHOLDER, text):
                if placeholder not in defined:
                    raise AdapterNameError(f"{where}: placeholder {placeholder!r} is defined by none of this request's adapters")
