"""The engine: request -> plan -> step -> blend -> decode.

One group of requests that share resolution and step count runs each denoising step as ONE UNet
forward over every branch row of every request; each request keeps its own seed, prompt,
negative prompt, guidance and adapters. Requests that cannot share a step are grouped.
"""

from __future__ import annotations

import functools
import inspect
import random
from concurrent.futures import ThreadPoolExecutor
import re
import time
from dataclasses import dataclass, field

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from . import tiny
from .adapters.lora import LoraRuntime, attention_targets, runtime_buckets, slots_for_budget
from .adapters.store import LORA_LIKE, AdapterStore
from .api import (
    GenerationOutput,
    Guidance,
    Request,
    normalize_adapters,
    normalize_guidance,
    validate_request,
)
from .errors import AdapterNameError, ImpastoError, RequestError
from .guidance import BranchLayout, blend, branch_table
from .loading import BaseModel, load_base_model
from .attention import PlanState, install_planned_attention
from .plan import PLACEHOLDER, Branch, build_plan


@dataclass
class _Job:
    """One validated request inside a batch."""

    index: int
    request: Request
    guidance: Guidance
    adapters: list
    height: int
    width: int
    seed: int
    out: GenerationOutput = field(default_factory=GenerationOutput)
    styles: tuple = ()  # ((style adapter name, suffix or None), ...) in Guidance.styles order

    @property
    def has_uncond(self) -> bool:
        return self.guidance.cfg > 1.0

    def adapter_names(self) -> set[str]:
        """Every adapter the request uses: its own and its styles'."""
        return {a.name for a in self.adapters} | {name for name, _ in self.styles}

    def adapter_key(self) -> tuple:
        """The request's adapters as a hashable ((name, scale), ...), applied to every branch."""
        return tuple((a.name, float(a.scale), tuple(sorted(a.options.items()))) for a in self.adapters)

    def branches(self) -> list[tuple[str, tuple]]:
        """(text, adapters) per branch: [uncond], cond, then one per style, whose text gets the
        style's suffix and whose adapters add the style LoRA at scale 1."""
        neg = self.request.negative_prompt or ""
        base = self.adapter_key()
        out = ([(neg, base)] if self.has_uncond else []) + [(self.request.prompt, base)]
        for name, suffix in self.styles:
            text = self.request.prompt + (" " + suffix if suffix else "")
            out.append((text, base + ((name, 1.0, ()),)))
        return out


class Engine:
    """A frozen base model serving batches of requests, each with its own adapters and guidance."""

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
    ):
        """compile: False, True (torch.compile's default backend) or a backend name such as
        "aot_eager". The UNet forward is compiled once per batch shape, and the LoRA pools switch
        to the fixed mode (attention projections, one bucket padded to max_rank), so swapping
        adapters never recompiles. device_pool_bytes, when given, sets the slots per bucket to
        what fits the budget (overriding slots_per_bucket)."""
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_rank = max_rank
        self.max_adapters_per_row = max_adapters_per_row
        self.progress = progress
        self.image_processor = VaeImageProcessor(vae_scale_factor=base.vae_scale_factor)
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
        runtime = functools.partial(LoraRuntime, slots_per_bucket=slots_per_bucket, max_rank=max_rank,
                                    max_adapters_per_row=max_adapters_per_row, device=self.device, dtype=dtype)
        self.lora = runtime(base.unet, fixed_targets=fixed)
        self.te_lora = runtime(base.text_encoder)
        self._plan_state = PlanState()
        self._attn2 = install_planned_attention(base.unet, self._plan_state)
        self.adapters.runtimes = (self.lora, self.te_lora)
        self._unet = base.unet
        if compile:
            self._unet = torch.compile(base.unet, backend="inductor" if compile is True else compile, dynamic=False)
        self._prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="impasto-prefetch")
        # UNet downsamples by 2 per down block but the last; latents must divide evenly.
        self._size_multiple = base.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str = "tiny",
        *,
        device=None,
        dtype=None,
        scheduler=None,
        adapter_root=None,
        host_cache_bytes=None,
        device_pool_bytes=None,
        max_rank: int = 64,
        max_adapters_per_row: int = 4,
        slots_per_bucket: int = 16,
        progress: bool = False,
        compile=False,
    ) -> "Engine":
        """Load a local diffusers SD-layout folder, or "tiny" (the miniature model shipped with
        impasto). No network, ever; a missing or malformed component raises ModelLoadError."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.float16
        path = path_or_name
        if path_or_name == "tiny":
            path, trained = tiny.tiny_model_dir()
            if not trained:
                tiny.warn_random()
        base = load_base_model(path, device=device, dtype=dtype, scheduler=scheduler)
        return cls(
            base,
            device=device,
            dtype=dtype,
            adapter_root=adapter_root,
            host_cache_bytes=host_cache_bytes,
            device_pool_bytes=device_pool_bytes,
            max_rank=max_rank,
            max_adapters_per_row=max_adapters_per_row,
            slots_per_bucket=slots_per_bucket,
            progress=progress,
            compile=compile,
        )

    # ------------------------------------------------------------------ public API
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
    ) -> GenerationOutput:
        """Generate images for one prompt; raises the request's error instead of returning it."""
        req = Request(
            prompt,
            adapters=adapters,
            guidance=guidance,
            negative_prompt=negative_prompt,
            steps=steps,
            seed=seed,
            height=height,
            width=width,
            num_images=num_images,
            output_type=output_type,
        )
        out = self.generate_batch([req])[0]
        if out.error is not None:
            raise out.error
        return out

    def generate_batch(self, requests) -> list[GenerationOutput]:
        """Serve many requests; outputs in request order. A failed request gets `.error` and the
        others are still served. Requests sharing (height, width, steps) share every UNet forward."""
        t0 = time.perf_counter()
        jobs, outputs = [], []
        for i, req in enumerate(requests):
            try:
                job = self._prepare(i, req)
                jobs.append(job)
                outputs.append(job.out)
            except ImpastoError as e:
                outputs.append(GenerationOutput(error=e, seed=getattr(req, "seed", None)))
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault((job.height, job.width, job.request.steps), []).append(job)
        chunks = [chunk for group in groups.values() for chunk in self._fit_slots(group)]
        for i, chunk in enumerate(chunks):
            if i + 1 < len(chunks):  # the next chunk's adapters load while this one computes
                self._prefetch.submit(self._prefetch_adapters, chunks[i + 1])
            self._run_group(chunk)
        for out in outputs:
            out.timings.setdefault("total", time.perf_counter() - t0)
        return outputs

    # ------------------------------------------------------------------ internals
    def _prepare(self, index: int, req: Request) -> _Job:
        if not isinstance(req, Request):
            raise RequestError(f"requests[{index}]: expected impasto.Request, got {type(req).__name__}")
        validate_request(req)
        guidance = normalize_guidance(req.guidance)
        adapters = normalize_adapters(req.adapters)
        per_row = len(adapters) + (1 if guidance.styles else 0)  # a style row adds its style LoRA
        if per_row > self.max_adapters_per_row:
            raise RequestError(
                f"adapters: {len(adapters)} adapters named{' plus a style' if guidance.styles else ''}, "
                f"max_adapters_per_row is {self.max_adapters_per_row}"
            )
        styles = []
        for name, weight in guidance.styles.items():
            info = self.adapters.info(name)
            if info.family != "style":
                raise AdapterNameError(f"guidance.styles: {name!r} is a {info.family} adapter, not a style adapter")
            if not isinstance(weight, (int, float)) or weight != weight:
                raise RequestError(f"guidance.styles[{name!r}]: weight must be a number, got {weight!r}")
            styles.append((name, info.suffix))
        adapters = self.adapters.resolve(adapters)
        self._check_adapters(adapters, req)
        default = self.base.unet.config.sample_size * self.base.vae_scale_factor
        height, width = req.height or default, req.width or default
        for name, v in (("height", height), ("width", width)):
            if v % self._size_multiple:
                raise RequestError(f"{name}: {v} is not a multiple of {self._size_multiple} for this model")
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(2**63)
        return _Job(index, req, guidance, adapters, height, width, seed, GenerationOutput(seed=seed), tuple(styles))

    def _prefetch_adapters(self, jobs: list[_Job]) -> None:
        """Read a later chunk's adapters into the host cache; a failure is left for that
        request's own load to report."""
        for name in set().union(*(job.adapter_names() for job in jobs)):
            try:
                self.adapters.load(name)
            except Exception:  # noqa: BLE001 - reported by the request's own load
                pass

    def _fit_slots(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Split a group so no rank bucket needs more distinct adapters than it has slots."""
        chunks, current, used = [], [], {}
        for job in jobs:
            need = {}
            for name in job.adapter_names():
                info = self.adapters.info(name)
                if info.family in LORA_LIKE:
                    need.setdefault(self.lora.bucket(info.rank), set()).add(name)
            fits = all(len(used.get(b, set()) | names) <= self.lora.S for b, names in need.items())
            if current and not fits:
                chunks.append(current)
                current, used = [], {}
            current.append(job)
            for b, names in need.items():
                used.setdefault(b, set()).update(names)
        return chunks + [current] if current else chunks

    def _load_adapters(self, jobs: list[_Job]) -> tuple[list[_Job], dict]:
        """Read every adapter the group names; a request whose adapter fails gets that error."""
        files, ok = {}, []
        for job in jobs:
            try:
                for name in job.adapter_names():
                    if name not in files:
                        files[name] = self.adapters.load(name)
                ok.append(job)
            except ImpastoError as e:
                job.out.error = e
        return ok, files

    def _check_adapters(self, adapters, req: Request) -> None:
        """Family rules of a request's adapters, and that every placeholder in its prompts is
        defined by exactly one of its adapters."""
        defined = {}
        for a in adapters:
            info = self.adapters.info(a.name)
            if info.family == "style":
                raise AdapterNameError(f"adapters: {a.name!r} is a style adapter; name it in guidance.styles")
            if info.family == "rank1":
                if a.scale != 1.0:
                    raise RequestError(f"adapters: {a.name!r} is a rank1 (Perfusion) adapter: tune it with beta and "
                                       f"tau, not a scale (got {a.scale})")
                unknown = set(a.options) - {"beta", "tau", "global_lock"}
                if unknown:
                    raise RequestError(f"adapters: {a.name!r}: unknown rank1 options {sorted(unknown)}")
                if "tau" in a.options and not float(a.options["tau"]) > 0:
                    raise RequestError(f"adapters: {a.name!r}: tau must be > 0, got {a.options['tau']}")
            elif a.options:
                raise RequestError(f"adapters: {a.name!r} ({info.family}) takes no options, got {sorted(a.options)}")
            for placeholder, _ in info.token_map:
                if placeholder in defined:
                    raise AdapterNameError(
                        f"adapters: {a.name!r} and {defined[placeholder]!r} both define the placeholder {placeholder!r}"
                    )
                defined[placeholder] = a.name
        for where, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt or "")):
            for placeholder in re.findall(PLACEHOLDER, text):
                if placeholder not in defined:
                    raise AdapterNameError(f"{where}: placeholder {placeholder!r} is defined by none of this request's adapters")

    def _run_group(self, jobs: list[_Job]) -> None:
        """Plan, denoise and decode one group of requests sharing size and step count."""
        with self.adapters.pinned(set().union(*(job.adapter_names() for job in jobs))):
            self._run_pinned_group(jobs)

    def _run_pinned_group(self, jobs: list[_Job]) -> None:
        base, dev, dtype = self.base, self.device, self.dtype
        jobs, files = self._load_adapters(jobs)
        if not jobs:
            return
        height, width, steps = jobs[0].height, jobs[0].width, jobs[0].request.steps
        t_plan = time.perf_counter()

        # -- plan: once per distinct (request, branch): text encoding, then every attn2 K/V
        branches = [Branch(text, adapters) for job in jobs for text, adapters in job.branches()]
        plan = build_plan(branches, base, self._attn2, self.lora, self.adapters, files, dev, dtype, self.te_lora)

        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        scheduler.set_timesteps(steps, device=dev)
        latent_shape = (base.unet.config.in_channels, height // base.vae_scale_factor, width // base.vae_scale_factor)

        row_branch, row_latent, row_adapters, layouts, latents, generators = [], [], [], [], [], []
        row, latent, branch = 0, 0, 0
        for job in jobs:
            n = job.request.num_images
            gen = torch.Generator("cpu").manual_seed(job.seed)
            latents.append(randn_tensor((n, *latent_shape), generator=gen, device=dev, dtype=dtype))
            generators += [gen] * n
            style_weights = tuple(float(w) for w in job.guidance.styles.values())
            layout = BranchLayout(row, n, job.guidance.cfg, job.has_uncond, style_weights, job.guidance.rescale)
            for _, adapters in job.branches():
                row_branch += [plan.index[branch]] * n
                row_latent += range(latent, latent + n)
                lora = [(name, scale) for name, scale, _ in adapters if self.adapters.info(name).family in LORA_LIKE]
                row_adapters += [lora] * n
                branch += 1
            layouts.append(layout)
            row += layout.num_rows
            latent += n
        row_branch = torch.tensor(row_branch, device=dev)
        row_latent = torch.tensor(row_latent, device=dev)
        encoder_hidden_states = plan.embeds[row_branch]
        kv_rows = {name: (k[row_branch], v[row_branch]) for name, (k, v) in plan.kv.items()}
        latents = torch.cat(latents) * scheduler.init_noise_sigma
        table = branch_table(layouts, dev)
        step_kwargs = self._step_kwargs(scheduler, generators)
        t_denoise = time.perf_counter()

        # -- step: one UNet forward for every row of every request; attn2 reads the plan's K/V
        self._plan_state.kv = kv_rows
        try:
            with self.lora.activate(row_adapters, files), torch.inference_mode():
                for t in tqdm(scheduler.timesteps, disable=not self.progress, desc="denoise", leave=False):
                    model_input = scheduler.scale_model_input(latents[row_latent], t)
                    noise = self._unet(
                        model_input, t, encoder_hidden_states=encoder_hidden_states, return_dict=False
                    )[0]
                    noise = blend(noise, table)
                    latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        finally:
            self._plan_state.kv = None
        t_decode = time.perf_counter()

        # -- decode
        need_pixels = any(job.request.output_type != "latent" for job in jobs)
        if need_pixels:
            with torch.inference_mode():
                pixels = base.vae.decode(latents / base.vae.config.scaling_factor, return_dict=False)[0]
        t_end = time.perf_counter()

        start = 0
        for job in jobs:
            n = job.request.num_images
            if job.request.output_type == "latent":
                job.out.images = latents[start : start + n].clone()
            else:
                image = pixels[start : start + n]
                job.out.images = self.image_processor.postprocess(
                    image, output_type=job.request.output_type, do_denormalize=[True] * n
                )
            start += n
            job.out.timings.update(plan=t_denoise - t_plan, denoise=t_decode - t_denoise, decode=t_end - t_decode)

    @staticmethod
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
