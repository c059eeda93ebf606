"""Serving under Poisson load: step-level admission vs static batching vs diffusers+PEFT (issue 12 §6).

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/bench_serving.py \
        [--requests 48] [--loads 0.5 0.8 1.0 1.2] [--library 100] [--styles 4] [--threads 2]

Model: the shipped miniature model (`Engine.from_pretrained("tiny")`; the diffusers side loads the
same folder, engine/tiny/model/), 32x32 px, DDIM, cfg 7.5, float32, CPU.

Library, built by the script into a temp folder with PEFT (`unet.add_adapter(LoraConfig(r=8,
lora_alpha=8, target_modules=to_q/to_k/to_v/to_out.0, init_lora_weights=False))` +
`save_lora_weights`, as bench_multi_lora.py does): `--library` plain LoRAs and `--styles` style LoRAs
(registered with impasto as family="style" with a suffix "in <name> style").

Request mix (one list, the same for every system and every load): prompt from the tiny world's
shapes/colours, seed = index, steps uniform in 10..50, one LoRA per request drawn Zipf(1.1) over the
library (numpy `zipf`, truncated by rejection, rank mapped through a fixed permutation), weight 1.0;
20 % of the requests also carry a style (uniform over the styles, style weight 3.0). Arrivals:
one unit-rate Poisson sequence (exponential gaps, normalized to mean 1 so that the realized rate
is the nominal one), scaled to each load's rate, so every load level offers the same requests in
the same order; load = fraction of the measured capacity.

Capacity: impasto step-level throughput with the queue saturated (all requests submitted at t=0,
capacity = requests / time to the last completion), on the same request list.

Systems, side by side in one run, per load level, in this order:
  (a) impasto step-level admission: a driver thread calls `engine.submit` at each arrival time;
      the worker admits queued requests at every denoising-step boundary (continuous batching);
      completion time = when the job's done-callback runs.
  (b) impasto static batching through `engine.generate_batch`, with Ray Serve `@serve.batch`
      semantics (max_concurrent_batches=1): when the engine is free, the batch is the queued
      requests in arrival order, closed when the next one would exceed `--static-rows` UNet rows
      (2 per request, 3 with a style) or `--static-wait` s after its oldest request arrived,
      whichever is first; every request of a batch completes when the batch returns.
  (c) diffusers+PEFT one request at a time, FIFO: one `StableDiffusionPipeline` on the same folder,
      every LoRA (plain and style) loaded once up front with `load_lora_weights`, then per request
      `set_adapters([lora])` + a pipeline call. A style request runs a small custom denoising loop
      over the pipeline's components, as the Pair Customization reference pipeline does (and as
      tests/test_styles.py's reference): per step, uncond+cond in one UNet call with the request's
      LoRA, then `set_adapters([lora, style], [1, 1])` and one more UNet call on
      `prompt + " " + suffix`, blended as e = e_u + cfg (e_c - e_u) + w (e_s - e_c).
  (d) diffusers+PEFT batching requests that share an adapter (its strongest form): when free, take
      the oldest queued request and every queued request with the same (LoRA, style, steps), up to
      `--static-rows` rows, and run them as one batched call (the pipeline with a prompt list and
      one generator per request, or the style loop batched).
(c) and (d) are simulated servers in the main thread (they look at the clock to see which requests
have arrived); nothing runs concurrently with them.

Per system and load: throughput (requests / (last completion - first arrival)), p50/p99 latency
(arrival to completion, queueing included), SLO attainment (fraction of requests done within
`--slo-factor` x that request's solo latency; the solo latencies are measured once per request,
on an idle system, on the side named by `--slo-base`), UNet forwards and mean rows per forward
(a forward hook on each side's UNet), and max |image - reference| over the requests (reference =
the diffusers solo image of the same request; a request's image must not depend on the load).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 8
CFG = 7.5
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white")
SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon", "diamond", "cross")
STYLE_NAMES = ("watercolor", "sketch", "pixel", "neon", "mosaic", "ink", "pastel", "comic")


@dataclass
class Spec:
    idx: int
    prompt: str
    steps: int
    lora: str
    style: str | None
    seed: int
    unit_arrival: float  # arrival time at rate 1 req/s

    @property
    def rows(self) -> int:
        return 3 if self.style else 2

    @property
    def key(self) -> tuple:
        return (self.lora, self.style, self.steps)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def model_dir(arg: str | None) -> str:
    if arg:
        return arg
    spec = importlib.util.find_spec("impasto")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("impasto is not installed; pass --model")
    return os.path.join(list(spec.submodule_search_locations)[0], "tiny", "model")


# ------------------------------------------------------------------------------ library
def build_library(folder: str, model: str, n_lora: int, n_styles: int):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=torch.float32)
    loras, styles = {}, {}
    names = [(f"l{i}", i, None) for i in range(n_lora)] + [
        (STYLE_NAMES[i % len(STYLE_NAMES)] + (str(i) if i >= len(STYLE_NAMES) else ""), 10_000 + i, "style")
        for i in range(n_styles)]
    for name, seed, kind in names:
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False),
                         adapter_name=name)
        out = os.path.join(folder, name)
        StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=name))
        unet.delete_adapters(name)
        path = os.path.join(out, "pytorch_lora_weights.safetensors")
        if kind == "style":
            styles[name] = (path, f"in {name} style")
        else:
            loras[name] = path
    return loras, styles


def make_requests(n: int, loras: list[str], styles: list[str], style_frac: float, seed: int) -> list[Spec]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(loras))
    gaps = rng.exponential(1.0, n)[1:]
    gaps /= gaps.mean()  # realized mean rate = the nominal rate (a short Poisson run can be 30 % off)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    out = []
    for i in range(n):
        r = int(rng.zipf(1.1))
        while r > len(loras):
            r = int(rng.zipf(1.1))
        style = str(rng.choice(styles)) if styles and rng.random() < style_frac else None
        prompt = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)} on a {rng.choice(COLOURS)} background"
        out.append(Spec(i, prompt, int(rng.integers(10, 51)), loras[perm[r - 1]], style, i, float(arrivals[i])))
    return out


class RowCounter:
    """Counts UNet forwards and their batch rows (a forward hook; thread-safe enough: list.append)."""

    def __init__(self, unet):
        self.rows: list[int] = []

        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs.get("sample")
            if isinstance(x, torch.Tensor):
                self.rows.append(int(x.shape[0]))

        unet.register_forward_hook(hook, with_kwargs=True)

    def take(self) -> list[int]:
        out, self.rows = self.rows, []
        return out


# ------------------------------------------------------------------------------ diffusers side
class DiffusersSide:
    def __init__(self, model: str, loras: dict, styles: dict, size: int, style_weight: float):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        self.pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, torch_dtype=torch.float32,
                                                            safety_checker=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        t = time.perf_counter()
        for name, path in list(loras.items()) + [(n, p) for n, (p, _) in styles.items()]:
            self.pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path), adapter_name=name)
        self.load_s = time.perf_counter() - t
        self.suffix = {n: s for n, (_, s) in styles.items()}
        self.size = size
        self.style_weight = style_weight
        self.counter = RowCounter(self.pipe.unet)
        self.set_adapters_s = 0.0
        self.set_adapters_calls = 0

    def _use(self, names, weights=None):
        t = time.perf_counter()
        self.pipe.set_adapters(names, weights)
        self.set_adapters_s += time.perf_counter() - t
        self.set_adapters_calls += 1

    def run(self, group: list[Spec]) -> list[np.ndarray]:
        """One call for requests that share (lora, style, steps); returns one HxWx3 image each."""
        lora, style, steps = group[0].key
        assert all(s.key == group[0].key for s in group)
        gens = [torch.Generator().manual_seed(s.seed) for s in group]
        if style is None:
            self._use([lora])
            out = self.pipe([s.prompt for s in group], num_inference_steps=steps, guidance_scale=CFG,
                            height=self.size, width=self.size, generator=gens, output_type="np")
            return list(out.images)
        return list(self._style_loop(group, gens))

    @torch.no_grad()
    def _style_loop(self, group: list[Spec], gens):
        from diffusers.utils.torch_utils import randn_tensor

        pipe, lora, style, steps = self.pipe, group[0].lora, group[0].style, group[0].steps
        n = len(group)
        sched = pipe.scheduler
        sched.set_timesteps(steps)
        cond, uncond = pipe.encode_prompt([s.prompt for s in group], "cpu", 1, True, [""] * n)
        e_uc = torch.cat([uncond, cond])
        e_s_text = pipe.encode_prompt([f"{s.prompt} {self.suffix[style]}" for s in group], "cpu", 1, False)[0]
        c, f = pipe.unet.config.in_channels, pipe.vae_scale_factor
        lat = torch.cat([randn_tensor((1, c, self.size // f, self.size // f), generator=g) for g in gens])
        lat = lat * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(lat, t)
            self._use([lora])
            e_u, e_c = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=e_uc).sample.chunk(2)
            self._use([lora, style], [1.0, 1.0])
            e_s = pipe.unet(x, t, encoder_hidden_states=e_s_text).sample
            e = e_u + CFG * (e_c - e_u) + self.style_weight * (e_s - e_c)
            lat = sched.step(e, t, lat).prev_sample
        image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        return pipe.image_processor.postprocess(image, output_type="np")


def serve_diffusers(side: DiffusersSide, specs: list[Spec], arrivals: np.ndarray, grouped: bool, max_rows: int):
    """A FIFO server (grouped: the head's (lora, style, steps) group, up to max_rows rows)."""
    n = len(specs)
    done = np.zeros(n)
    images: list = [None] * n
    remaining = list(range(n))  # in arrival order
    t0 = time.perf_counter()
    while remaining:
        now = time.perf_counter() - t0
        head = remaining[0]
        if arrivals[head] > now:
            time.sleep(arrivals[head] - now)
            now = time.perf_counter() - t0
        if grouped:
            group, rows = [], 0
            for k in remaining:
                if arrivals[k] > now:
                    break
                if specs[k].key == specs[head].key and rows + specs[k].rows <= max_rows:
                    group.append(k)
                    rows += specs[k].rows
        else:
            group = [head]
        outs = side.run([specs[k] for k in group])
        t = time.perf_counter() - t0
        for k, img in zip(group, outs):
            done[k], images[k] = t, img
        remaining = [k for k in remaining if k not in set(group)]
    return done, images


# ------------------------------------------------------------------------------ impasto side
class ImpastoSide:
    def __init__(self, loras: dict, styles: dict, size: int, style_weight: float, max_rows: int, extra: dict):
        import impasto

        self.impasto = impasto
        self.engine = impasto.Engine.from_pretrained("tiny", device="cpu", max_batch_rows=max_rows, **extra)
        t = time.perf_counter()
        for name, path in loras.items():
            self.engine.adapters.register(name, path)
        for name, (path, suffix) in styles.items():
            self.engine.adapters.register(name, path, family="style", suffix=suffix)
        self.register_s = time.perf_counter() - t
        self.size = size
        self.style_weight = style_weight
        self.counter = RowCounter(self.engine.base.unet)

    def request(self, s: Spec, steps: int | None = None):
        imp = self.impasto
        g = imp.Guidance(cfg=CFG, styles={s.style: self.style_weight}) if s.style else CFG
        return imp.Request(s.prompt, adapters=[(s.lora, 1.0)], guidance=g, steps=steps or s.steps, seed=s.seed,
                           height=self.size, width=self.size, output_type="np")

    def warm(self, loras: list[str], styles: list[str], chunk: int = 16):
        """Touch every adapter once (1-step requests), so the host cache holds the library, as the
        diffusers side holds every adapter after load_lora_weights; untimed."""
        specs = [Spec(i, "a red star", 1, name, None, i, 0.0) for i, name in enumerate(loras)]
        specs += [Spec(i, "a red star", 1, loras[0], st, i, 0.0) for i, st in enumerate(styles)]
        for i in range(0, len(specs), chunk):
            outs = self.engine.generate_batch([self.request(s) for s in specs[i:i + chunk]])
            bad = [o.error for o in outs if o.error is not None]
            if bad:
                raise RuntimeError(f"warm-up failed: {bad[0]!r}")

    def serve_step_level(self, specs: list[Spec], arrivals: np.ndarray, timeout: float):
        n = len(specs)
        done = np.full(n, np.nan)
        jobs: list = [None] * n
        errors: list = []

        def record(k):
            def cb(job):
                done[k] = time.perf_counter() - t0
            return cb

        def driver():
            try:
                for k in range(n):
                    delay = t0 + arrivals[k] - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    job = self.engine.submit(self.request(specs[k]))
                    jobs[k] = job
                    job.add_done_callback(record(k))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t0 = time.perf_counter()
        th = threading.Thread(target=driver, name="bench-driver")
        th.start()
        th.join()
        if errors:
            raise errors[0]
        images = []
        deadline = time.perf_counter() + timeout
        for k, job in enumerate(jobs):
            out = job.result(timeout=max(1.0, deadline - time.perf_counter()))
            if out.error is not None:
                raise RuntimeError(f"request {k} failed: {out.error!r}")
            images.append(np.asarray(out.images)[0])
        for _ in range(100):  # the done-callback may run just after result() returns
            if not np.isnan(done).any():
                break
            time.sleep(0.01)
        if np.isnan(done).any():
            raise RuntimeError(f"done-callback never ran for requests {np.flatnonzero(np.isnan(done)).tolist()}")
        return done, images

    def serve_static(self, specs: list[Spec], arrivals: np.ndarray, max_rows: int, wait: float):
        n = len(specs)
        done = np.zeros(n)
        images: list = [None] * n
        i = 0
        t0 = time.perf_counter()
        while i < n:
            now = time.perf_counter() - t0
            if arrivals[i] > now:
                time.sleep(arrivals[i] - now)
                now = time.perf_counter() - t0
            # the batch closes at the row limit or `wait` after its oldest request, whichever first
            j, rows = i, 0
            while j < n and rows + specs[j].rows <= max_rows:
                rows += specs[j].rows
                j += 1
            fire = max(now, min(arrivals[i] + wait, arrivals[j - 1]))
            if fire > now:
                time.sleep(fire - now)
            batch = [k for k in range(i, j) if arrivals[k] <= fire]
            outs = self.engine.generate_batch([self.request(specs[k]) for k in batch])
            t = time.perf_counter() - t0
            for k, o in zip(batch, outs):
                if o.error is not None:
                    raise RuntimeError(f"request {k} failed: {o.error!r}")
                done[k], images[k] = t, np.asarray(o.images)[0]
            i += len(batch)
        return done, images

    def capacity(self, specs: list[Spec], timeout: float) -> tuple[float, list[int]]:
        arrivals = np.zeros(len(specs))
        done, _ = self.serve_step_level(specs, arrivals, timeout)
        return len(specs) / float(done.max()), self.counter.take()

    def solo(self, s: Spec, timeout: float) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        out = self.engine.submit(self.request(s)).result(timeout=timeout)
        dt = time.perf_counter() - t
        if out.error is not None:
            raise RuntimeError(f"solo request {s.idx} failed: {out.error!r}")
        return dt, np.asarray(out.images)[0]


# ------------------------------------------------------------------------------ main
def summarize(name, specs, arrivals, done, images, ref, solo: dict, slo_factor, rows):
    lat = done - arrivals
    n = len(specs)
    thr = n / float(done.max() - arrivals.min())
    slo = {k: float(np.mean(lat <= slo_factor * v)) for k, v in solo.items()}
    diff = max(float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
               for a, b in zip(images, ref)) if ref is not None else float("nan")
    return dict(system=name, thr=thr, p50=pct(lat, 50), p99=pct(lat, 99), mean=float(lat.mean()), slo=slo,
                latencies=lat.tolist(),
                forwards=len(rows), rows_per_fwd=(sum(rows) / len(rows)) if rows else 0.0, diff=diff)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 1.0, 1.2])
    ap.add_argument("--library", type=int, default=100)
    ap.add_argument("--styles", type=int, default=4)
    ap.add_argument("--style-frac", type=float, default=0.2)
    ap.add_argument("--style-weight", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--max-rows", type=int, default=64, help="impasto max_batch_rows")
    ap.add_argument("--static-rows", type=int, default=64, help="row cap of a (b) / (d) batch")
    ap.add_argument("--static-wait", type=float, default=0.1, help="(b): s after the oldest queued request")
    ap.add_argument("--slo-factor", type=float, default=2.0)
    ap.add_argument("--slo-base", choices=["diffusers", "impasto"], default="diffusers",
                    help="solo latencies the ratio table's SLO uses (the other is printed too when measured)")
    ap.add_argument("--json", default=None, help="write every per-request latency and the config here")
    ap.add_argument("--systems", nargs="+", default=["a", "b", "c", "d"], choices=["a", "b", "c", "d"])
    ap.add_argument("--capacity", type=float, default=None, help="req/s; skip measuring it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="s to wait for a run's jobs (hang detection)")
    ap.add_argument("--model", default=None, help="model folder for the diffusers side (default: impasto's tiny)")
    ap.add_argument("--slots-per-bucket", type=int, default=None, help="passed to Engine.from_pretrained if given")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    T0 = time.perf_counter()

    model = model_dir(args.model)
    want_imp = any(s in args.systems for s in "ab") or args.slo_base == "impasto" or args.capacity is None
    want_dif = any(s in args.systems for s in "cd") or args.slo_base == "diffusers"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        loras, styles = build_library(tmp, model, args.library, args.styles)
        lib_s = time.perf_counter() - t
        lib_mb = sum(os.path.getsize(p) for p in loras.values()) / 1e6
        specs = make_requests(args.requests, list(loras), list(styles), args.style_frac, args.seed)
        unit = np.array([s.unit_arrival for s in specs])
        n_style = sum(1 for s in specs if s.style)
        dist = len({s.lora for s in specs})
        top = max(sum(1 for s in specs if s.lora == name) for name in loras)
        groups = len({s.key for s in specs})
        print(f"library: {len(loras)} LoRAs + {len(styles)} style LoRAs, rank {RANK} on {TARGETS}, "
              f"{lib_mb / len(loras):.2f} MB each, built in {lib_s:.1f} s")
        print(f"requests: {len(specs)}, steps 10-50 (mean {np.mean([s.steps for s in specs]):.1f}), "
              f"{dist} distinct LoRAs (top one {top}x), {n_style} with a style (weight {args.style_weight}), "
              f"{groups} distinct (LoRA, style, steps) keys; {args.size}x{args.size} px, cfg {CFG}, "
              f"{torch.get_num_threads()} torch threads, model {model}, load average {os.getloadavg()[0]:.1f}")

        imp = dif = None
        if want_imp:
            import impasto

            extra = {} if args.slots_per_bucket is None else {"slots_per_bucket": args.slots_per_bucket}
            imp = ImpastoSide(loras, styles, args.size, args.style_weight, args.max_rows, extra)
            t = time.perf_counter()
            imp.warm(list(loras), list(styles))
            print(f"impasto {getattr(impasto, '__version__', '?')}: registered in {imp.register_s:.2f} s, "
                  f"warm-up (every adapter once, 1 step) {time.perf_counter() - t:.1f} s")
            imp.counter.take()
        if want_dif:
            dif = DiffusersSide(model, loras, styles, args.size, args.style_weight)
            dif.run([Spec(0, "a red star", 2, next(iter(loras)), None, 0, 0.0)])  # warm-up
            dif.run([Spec(0, "a red star", 2, next(iter(loras)), next(iter(styles)), 0, 0.0)])
            print(f"diffusers+PEFT: {len(loras) + len(styles)} load_lora_weights up front in {dif.load_s:.1f} s")
            dif.counter.take()

        # solo latencies (idle system, one request at a time) and the reference images
        solo = {}
        ref = None
        if dif is not None:
            ts, ref = [], []
            for s in specs:
                t = time.perf_counter()
                ref.append(dif.run([s])[0])
                ts.append(time.perf_counter() - t)
            solo["diffusers"] = np.array(ts)
            dif.counter.take()
        if imp is not None and (args.slo_base == "impasto" or any(x in args.systems for x in "ab")):
            ts, imgs = [], []
            for s in specs:
                dt, img = imp.solo(s, args.timeout)
                ts.append(dt)
                imgs.append(img)
            solo["impasto"] = np.array(ts)
            imp_solo_imgs = imgs
            imp.counter.take()
        for k, v in solo.items():
            print(f"solo latency on {k}: p50 {pct(v, 50):.3f} s, mean {v.mean():.3f} s, max {v.max():.3f} s")
        if ref is not None and "impasto" in solo:
            d = max(float(np.abs(a - b).max()) for a, b in zip(imp_solo_imgs, ref))
            print(f"impasto solo vs diffusers solo images: max |diff| = {d:.2e}")
        if args.slo_base not in solo:
            raise SystemExit(f"--slo-base {args.slo_base}: that side's solo latencies were not measured")
        slo_keys = [args.slo_base] + [k for k in solo if k != args.slo_base]

        if args.capacity is not None:
            cap, cap_rows = args.capacity, []
            print(f"capacity given: {cap:.3f} req/s")
        else:
            cap, cap_rows = imp.capacity(specs, args.timeout)
            print(f"capacity (impasto step-level, queue saturated): {cap:.3f} req/s; "
                  f"{len(cap_rows)} UNet forwards, mean {np.mean(cap_rows):.1f} rows")

        results = []
        for load in args.loads:
            rate = load * cap
            arrivals = unit / rate
            for sys_ in args.systems:
                t = time.perf_counter()
                if sys_ == "a":
                    done, images = imp.serve_step_level(specs, arrivals, args.timeout)
                    rows, name = imp.counter.take(), "(a) impasto step-level"
                elif sys_ == "b":
                    done, images = imp.serve_static(specs, arrivals, args.static_rows, args.static_wait)
                    rows, name = imp.counter.take(), "(b) impasto static"
                elif sys_ == "c":
                    dif.set_adapters_s, dif.set_adapters_calls = 0.0, 0
                    done, images = serve_diffusers(dif, specs, arrivals, False, args.static_rows)
                    rows, name = dif.counter.take(), "(c) diffusers+PEFT 1-at-a-time"
                else:
                    dif.set_adapters_s, dif.set_adapters_calls = 0.0, 0
                    done, images = serve_diffusers(dif, specs, arrivals, True, args.static_rows)
                    rows, name = dif.counter.take(), "(d) diffusers+PEFT same-adapter batch"
                r = summarize(name, specs, arrivals, done, images, ref, solo, args.slo_factor, rows)
                r.update(load=load, rate=rate, wall=time.perf_counter() - t, loadavg=os.getloadavg()[0],
                         set_adapters=dif.set_adapters_s if sys_ in "cd" else None,
                         set_adapters_calls=dif.set_adapters_calls if sys_ in "cd" else None)
                results.append(r)
                print(f"  load {load:.0%} (offered {rate:.3f} req/s, realized {(len(specs) - 1) / arrivals[-1]:.3f}) "
                      f"{name}: {r['thr']:.3f} req/s, p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, "
                      + ", ".join(f"SLO/{k} {r['slo'][k]:.0%}" for k in slo_keys)
                      + f", {r['forwards']} forwards x {r['rows_per_fwd']:.1f} rows, "
                      f"max|dimg| {r['diff']:.1e}, wall {r['wall']:.1f} s, loadavg {r['loadavg']:.1f}"
                      + (f", set_adapters {r['set_adapters']:.1f} s in {r['set_adapters_calls']} calls"
                         if r["set_adapters"] is not None else ""),
                      flush=True)
        if imp is not None:
            imp.engine.close()
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), capacity=cap, solo={k: v.tolist() for k, v in solo.items()},
                           requests=[vars(s) for s in specs], results=results), f, indent=1)

    print(f"\nconfig: {args.requests} requests per load, capacity {cap:.3f} req/s, SLO = done within "
          f"{args.slo_factor:g}x the request's solo latency (on {', '.join(slo_keys)}), static batch <= {args.static_rows} "
          f"rows / {args.static_wait:g} s wait, total run {time.perf_counter() - T0:.0f} s\n")
    print("| load | offered req/s | system | throughput req/s | p50 s | p99 s | "
          + " | ".join(f"SLO ({args.slo_factor:g}x {k} solo)" for k in slo_keys)
          + " | UNet forwards | rows/forward | max abs img diff vs ref |")
    print("|---|---|---|---|---|---|" + "---|" * len(slo_keys) + "---|---|---|")
    for r in results:
        print(f"| {r['load']:.0%} | {r['rate']:.3f} | {r['system']} | {r['thr']:.3f} | {r['p50']:.2f} | {r['p99']:.2f} | "
              + " | ".join(f"{r['slo'][k]:.0%}" for k in slo_keys)
              + f" | {r['forwards']} | {r['rows_per_fwd']:.1f} | {r['diff']:.1e} |")
    if "a" in args.systems and len(args.systems) > 1:
        print("\nratios, (a) step-level vs each other system at the same load "
              f"(throughput a/x, p50 x/a, p99 x/a, SLO on {args.slo_base} solo a - x):\n")
        print("| load | vs | throughput | p50 | p99 | SLO |")
        print("|---|---|---|---|---|---|")
        for load in args.loads:
            ra = next(r for r in results if r["load"] == load and r["system"].startswith("(a)"))
            for r in results:
                if r["load"] == load and not r["system"].startswith("(a)"):
                    print(f"| {load:.0%} | {r['system']} | {ra['thr'] / r['thr']:.2f}x | {r['p50'] / ra['p50']:.2f}x "
                          f"| {r['p99'] / ra['p99']:.2f}x | {100 * (ra['slo'][args.slo_base] - r['slo'][args.slo_base]):+.0f} pts |")


if __name__ == "__main__":
    main()
