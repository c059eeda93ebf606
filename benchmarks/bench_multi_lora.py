"""N requests, N different LoRAs: impasto's one batched forward vs diffusers+PEFT best practice.

    .venv/bin/python benchmarks/bench_multi_lora.py [--n 1 4 16] [--steps 10] [--repeats 2]
    .venv/bin/python benchmarks/bench_multi_lora.py --forward [--rows 8] [--repeats 16]
    .venv/bin/python benchmarks/bench_multi_lora.py --stream [--requests 300] [--adapters 200]

--stream: a Zipf(1.1) request stream over rank-8 LoRAs (the tiny random SD-layout model, batches
of `--batch` requests through `generate_batch`), each batch served four ways, interleaved: every
request with its own LoRA; the same, with requests for one adapter not stepped next to each other
(the worker's order before `_adjacent_by_lora`); every request naming one shared LoRA (the
stream's arithmetic floor: the same FLOPs, one adapter); no adapters.

--forward: one UNet forward of the 35 M-parameter SD-1.5-shaped UNet (bench_conditioning.py's
MEDIUM, 32x32 latents, rank-16 LoRAs on to_q/to_k/to_v/to_out.0) over `rows` rows, side by side:
plain; PEFT with one shared LoRA; impasto with the same shared LoRA in every row; impasto with a
distinct LoRA per row; the arithmetic floor (LoRA FLOPs / UNet FLOPs) and a profiler breakdown of
where impasto's LoRA time goes (the op's matmuls, its gathers and casts, the rest of the hook).

Side by side in one run, same requests and seeds:
  (a) impasto `generate_batch` with every request naming its own LoRA (one UNet forward per step);
  (b) diffusers+PEFT best practice: every adapter loaded once up front, then per request
      `set_adapters([name])` and a pipeline call, sequentially;
  (c) impasto with the same requests and no adapters (the floor).
Cost breakdown of (a) from the engine's own timings: plan (text encoding), denoise (UNet incl.
LoRA), decode (VAE); the LoRA op's share is denoise(a) - denoise(c).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

# A CPU-sized SD-layout model: wider than the test model so LoRA GEMMs are not trivially small.
UNET = dict(block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
RANK = 16
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Setup:
    n: int
    steps: int
    size: int


def build(folder: str, n_max: int, rank: int = RANK, unet_config: dict | None = None):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from impasto.tiny import build_random_model

    build_random_model(os.path.join(folder, "model"), seed=0, unet_config=UNET if unet_config is None else unet_config)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "model"), subfolder="unet")
    paths = []
    for i in range(n_max):
        torch.manual_seed(i)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=False),
                         adapter_name=f"a{i}")
        out = os.path.join(folder, f"a{i}")
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=f"a{i}"),
            unet_lora_adapter_metadata=unet.peft_config[f"a{i}"].to_dict())
        paths.append(os.path.join(out, "pytorch_lora_weights.safetensors"))
        unet.delete_adapters(f"a{i}")
    return os.path.join(folder, "model"), paths


def run_impasto(engine, s: Setup, with_adapters: bool):
    import impasto

    reqs = [impasto.Request(f"a red star number {i}", adapters=[f"a{i}"] if with_adapters else [],
                            seed=i, steps=s.steps, height=s.size, width=s.size, output_type="np")
            for i in range(s.n)]
    t = time.perf_counter()
    outs = engine.generate_batch(reqs)
    wall = time.perf_counter() - t
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return wall, outs[0].timings


def run_diffusers(pipe, s: Setup):
    t = time.perf_counter()
    for i in range(s.n):
        pipe.set_adapters([f"a{i}"])
        pipe(f"a red star number {i}", num_inference_steps=s.steps, height=s.size, width=s.size,
             generator=torch.Generator().manual_seed(i), output_type="np")
    return time.perf_counter() - t


def _lora_flops(unet, run):
    """FLOPs of every targeted projection's rank-RANK update in one forward: 2*tokens*R*(K+N)."""
    total, hooks = [0.0], []
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS) and "attn" in name:
            def hook(mod, args, out):
                total[0] += 2.0 * args[0].numel() / mod.in_features * RANK * (mod.in_features + mod.out_features)
            hooks.append(m.register_forward_hook(hook))
    run()
    for h in hooks:
        h.remove()
    return total[0]


def _breakdown(run, repeats=2):
    """Profiler attribution of one forward's LoRA time (ms per forward): the LoRA calls' total, their
    matmuls, their gathers/casts/masks, and the dispatch + checks around them."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import impasto.adapters.lora as runtime

    def marked(*a, **k):  # every LoRA call, whether it runs through the custom op or not
        with record_function("lora_apply"):
            return apply(*a, **k)

    apply, runtime.lora_apply = runtime.lora_apply, marked
    try:
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                with record_function("forward"):
                    run()
    finally:
        runtime.lora_apply = apply
    events = prof.events()

    def inside_op(e):  # an event under a LoRA call (the UNet's own matmuls excluded)
        p = e.cpu_parent
        while p is not None:
            if p.name == "lora_apply":
                return True
            p = p.cpu_parent
        return False

    def total(names, nested=False):
        return sum(e.cpu_time_total for e in events if e.name in names and (not nested or inside_op(e))) / 1e3 / repeats

    op = total(["lora_apply"])
    mm = total(["aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mm", "aten::addmm", "aten::addmm_"], nested=True)
    gathers = total(["aten::index", "aten::index_select", "aten::where", "aten::mul", "aten::mul_", "aten::clone", "aten::copy_",
                     "aten::_to_copy"], nested=True)
    return dict(op_ms=op, forward_ms=total(["forward"]), matmul_ms=mm, gather_ms=gathers)


def forward_main(args):
    import impasto  # noqa: F401
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from impasto.adapters.lora import LoraRuntime
    from impasto.adapters.lora_formats import read_lora
    from impasto.tiny import build_random_model

    medium = dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=256, attention_head_dim=8, sample_size=32, norm_num_groups=32)
    rows = args.rows
    with tempfile.TemporaryDirectory() as tmp:
        global UNET
        UNET = medium
        model, paths = build(tmp, rows)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
        peft_unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
        peft_unet.load_lora_adapter(os.path.dirname(paths[0]), weight_name=os.path.basename(paths[0]), adapter_name="a0", prefix="unet")
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, 4, 32, 32, generator=gen)
        enc = torch.randn(rows, 77, 256, generator=gen)
        t = torch.full((rows,), 500)
        names = {n for n, _ in unet.named_modules()}
        files = {f"a{i}": read_lora(p, names) for i, p in enumerate(paths)}
        rt = LoraRuntime(unet, slots_per_bucket=rows, max_adapters_per_row=1, device="cpu", dtype=torch.float32)

        def fwd(u):
            with torch.inference_mode():
                return u(x, t, enc).sample

        shared = rt.tables([[("a0", 1.0)]] * rows, files)
        distinct = rt.tables([[(f"a{i}", 1.0)] for i in range(rows)], files)
        def before(tables):  # the previous path: a matmul pair per run of rows, through the custom op
            from impasto.kernels import dispatch, lora as lk

            def runs_only(y, x, A, B, slots, scales, meta):
                if int(meta.stats[0]):
                    lk._lora_apply_segments(y, x, A, B, slots, scales, lk._segments(slots))

            reg = dispatch._REGISTRY["lora_apply"]
            ref, reg[dispatch.Backend.REFERENCE] = reg[dispatch.Backend.REFERENCE], runs_only
            eager, lk._eager = lk._eager, lambda *t: False
            try:
                rt.set_tables(tables, rows)
                return fwd(unet)
            finally:
                reg[dispatch.Backend.REFERENCE], lk._eager = ref, eager

        runs = {
            "plain": lambda: (rt.set_tables(None, rows), fwd(unet)),
            "peft_shared": lambda: fwd(peft_unet),
            "impasto_shared": lambda: (rt.set_tables(shared, rows), fwd(unet)),
            "impasto_distinct": lambda: (rt.set_tables(distinct, rows), fwd(unet)),
            "before_shared (runs, through the op)": lambda: before(shared),
            "before_distinct (runs, through the op)": lambda: before(distinct),
        }
        # the same arithmetic: impasto's shared-LoRA output equals PEFT's
        rt.set_tables(shared, rows)
        torch.testing.assert_close(fwd(unet), fwd(peft_unet), rtol=1e-4, atol=1e-4)
        rt.set_tables(None, rows)
        with FlopCounterMode(display=False) as fc:
            fwd(unet)
        unet_flops = fc.get_total_flops()
        lora_flops = _lora_flops(unet, lambda: fwd(unet))
        for fn in runs.values():  # warm-up
            fn()
        res = {k: [] for k in runs}
        cpu = {k: [] for k in runs}  # the thread's CPU time: what the VM's stolen time does not inflate
        keys = list(runs)
        for i in range(args.rounds * args.repeats):  # one forward per variant in turn, the order
            for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotated: drift hits all alike
                t0, c0 = time.perf_counter(), time.thread_time()
                runs[k]()
                res[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.thread_time() - c0) * 1e3)
        med = {k: statistics.median(v) for k, v in res.items()}
        mins = {k: min(v) for k, v in res.items()}
        # paired: each forward against the plain forward of the same turn (seconds apart), whose
        # ratio the VM's slow drift between speed modes (a forward's median is ~1.3x its min) spares
        paired = {k: statistics.median(a / b for a, b in zip(v, res["plain"])) for k, v in res.items()}
        paired_peft = {k: statistics.median(a / b for a, b in zip(v, res["peft_shared"])) for k, v in res.items()}
        cpu_paired = {k: statistics.median(a / b for a, b in zip(v, cpu["plain"])) for k, v in cpu.items()}
        cpu_paired_peft = {k: statistics.median(a / b for a, b in zip(v, cpu["peft_shared"])) for k, v in cpu.items()}
        print(f"config: UNet {medium} ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params), {rows} rows, "
              f"32x32 latents, 77 text tokens, rank {RANK} on {TARGETS}, float32, {torch.get_num_threads()} threads, "
              f"inference_mode, median of {args.repeats * args.rounds} forwards per variant, one of each in turn (min in brackets)")
        print(f"arithmetic floor: LoRA {lora_flops / 1e9:.2f} GFLOP / UNet {unet_flops / 1e9:.2f} GFLOP "
              f"= {lora_flops / unet_flops:.2%}")
        print("| variant | ms | x plain | x PEFT shared | x plain, paired | x PEFT shared, paired | CPU ms | "
              "CPU x plain, paired | CPU x PEFT shared, paired |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k in runs:
            print(f"| {k} | {med[k]:.1f} ({mins[k]:.1f}) | {med[k] / med['plain']:.3f} ({mins[k] / mins['plain']:.3f}) | "
                  f"{med[k] / med['peft_shared']:.3f} ({mins[k] / mins['peft_shared']:.3f}) | "
                  f"{paired[k]:.3f} | {paired_peft[k]:.3f} | {statistics.median(cpu[k]):.1f} | "
                  f"{cpu_paired[k]:.3f} | {cpu_paired_peft[k]:.3f} |")
        for k in ("impasto_shared", "impasto_distinct", "before_distinct (runs, through the op)"):
            b = _breakdown(runs[k])
            hook = med[k] - med["plain"]
            print(f"breakdown {k} (profiler, ms per forward): LoRA total over plain {hook:.1f}; "
                  f"in lora_apply {b['op_ms']:.1f} (matmuls {b['matmul_ms']:.1f}, gathers/masks/copies "
                  f"{b['gather_ms']:.1f}, the rest = checks + dispatch); profiled forward {b['forward_ms']:.1f}; "
                  f"calls per forward {len(rt.pools)}")


def stream_main(args):
    """Semantics: img/s of one request stream served four ways (module docstring), batch by batch
    with the variants' order rotated per batch, so load drift hits each alike; medians of rounds."""
    import numpy as np

    import impasto
    from impasto import worker

    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, args.adapters + 1) ** args.zipf_a
    picks = rng.choice(args.adapters, size=args.requests, p=p / p.sum())
    with tempfile.TemporaryDirectory() as tmp:
        model, paths = build(tmp, args.adapters, rank=8, unet_config={})
        engine = impasto.Engine.from_pretrained(model, slots_per_bucket=2 * args.batch)
        for i, path in enumerate(paths):
            engine.adapters.register(f"a{i}", path)
        grouped = worker._adjacent_by_lora

        def serve(batch, variant):
            names = {"own": lambda i: [f"a{i}"], "own, not adjacent": lambda i: [f"a{i}"],
                     "one shared": lambda i: ["a0"], "none": lambda i: []}[variant]
            reqs = [impasto.Request(f"a red star number {j}", adapters=names(int(i)), seed=j, steps=args.steps,
                                    height=args.size, width=args.size, output_type="np") for j, i in batch]
            worker._adjacent_by_lora = (lambda g: g) if variant == "own, not adjacent" else grouped
            try:
                t = time.perf_counter()
                outs = engine.generate_batch(reqs)
                wall = time.perf_counter() - t
            finally:
                worker._adjacent_by_lora = grouped
            assert all(o.error is None for o in outs), [o.error for o in outs]
            return wall

        variants = ["own", "own, not adjacent", "one shared", "none"]
        batches = [list(enumerate(picks))[k : k + args.batch] for k in range(0, args.requests, args.batch)]
        serve(batches[0], "own")  # warm-up
        rounds = {v: [] for v in variants}
        for _ in range(args.rounds):
            wall = dict.fromkeys(variants, 0.0)
            for b, batch in enumerate(batches):
                for v in variants[b % 4:] + variants[:b % 4]:
                    wall[v] += serve(batch, v)
            for v in variants:
                rounds[v].append(args.requests / wall[v])
        distinct = statistics.mean(len({int(i) for _, i in batch}) for batch in batches)
        print(f"config: tiny random SD-layout model ({sum(q.numel() for q in engine.base.unet.parameters()) / 1e6:.2f} M "
              f"UNet params), {args.requests} requests Zipf({args.zipf_a}) over {args.adapters} rank-8 LoRAs on {TARGETS} "
              f"({len({int(i) for i in picks})} drawn, {distinct:.1f} distinct per batch), batches of {args.batch}, "
              f"{args.steps} DDIM steps, cfg 7.5, {args.size}x{args.size} px, float32, {torch.get_num_threads()} threads, "
              f"median of {args.rounds} rounds")
        med = {v: statistics.median(r) for v, r in rounds.items()}
        print("| variant | img/s | x one shared | x none |")
        print("|---|---|---|---|")
        for v in variants:
            print(f"| {v} | {med[v]:.2f} | {med[v] / med['one shared']:.3f} | {med[v] / med['none']:.3f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--forward", action="store_true", help="the UNet-forward comparison (see the docstring)")
    ap.add_argument("--stream", action="store_true", help="the request-stream comparison (see the docstring)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--zipf-a", type=float, default=1.1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    if args.forward:
        return forward_main(args)
    if args.stream:
        return stream_main(args)

    import impasto
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        model, paths = build(tmp, max(args.n))
        engine = impasto.Engine.from_pretrained(model, slots_per_bucket=max(args.n))
        pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        for i, p in enumerate(paths):
            engine.adapters.register(f"a{i}", p)
            pipe.load_lora_weights(os.path.dirname(p), weight_name=os.path.basename(p), adapter_name=f"a{i}")
        u = engine.base.unet
        print(f"config: UNet {UNET} ({sum(p.numel() for p in u.parameters()) / 1e6:.1f} M params), "
              f"LoRA rank {RANK} on {TARGETS} of every attention, DDIM, cfg 7.5, {args.steps} steps, "
              f"{args.size}x{args.size} px, float32, {torch.get_num_threads()} threads, "
              f"median of {args.repeats} after a warm-up")
        rows = []
        for n in args.n:
            s = Setup(n, args.steps, args.size)
            run_impasto(engine, Setup(1, 2, args.size), True)  # warm-up
            a, c, b, ta, tc = [], [], [], None, None
            for _ in range(args.repeats):
                w, ta = run_impasto(engine, s, True)
                a.append(w)
                w, tc = run_impasto(engine, s, False)
                c.append(w)
                b.append(run_diffusers(pipe, s))
            a, b, c = statistics.median(a), statistics.median(b), statistics.median(c)
            rows.append((n, n / a, n / b, n / c, b / a, c / a, ta, tc))
        print("\n|  N | impasto img/s (a) | diffusers+PEFT img/s (b) | no-adapter img/s (c) | a/b speed | a/c speed "
              "| plan s | denoise s | LoRA share s | decode s |")
        print("|----|------|------|------|------|------|------|------|------|------|")
        for n, ia, ib, ic, ab, ac, ta, tc in rows:
            print(f"| {n:2d} | {ia:.2f} | {ib:.2f} | {ic:.2f} | {ab:.2f}x | {ac:.2f}x | {ta['plan']:.3f} | "
                  f"{ta['denoise']:.3f} | {max(ta['denoise'] - tc['denoise'], 0):.3f} | {ta['decode']:.3f} |")


# --- the shared-file layouts (LoCon, LoHa, LoKr, DoRA) next to plain LoRA -------------------------

CONVS = ["conv1", "conv2"]  # every resnet's 3x3 convs


def layout_configs():
    """Layout -> PEFT config of one adapter (what each tool's users train at about this size)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    return {
        "lora": LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False),
        "locon": LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS + CONVS, init_lora_weights=False),
        "loha": LoHaConfig(r=RANK // 2, alpha=RANK // 2, target_modules=TARGETS + CONVS, init_weights=False),
        "lokr": LoKrConfig(r=RANK // 2, alpha=RANK // 2, target_modules=TARGETS + CONVS, init_weights=False),
        "dora": LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, use_dora=True, init_lora_weights=False),
    }


def layouts_main():
    """N requests, each naming its own adapter of one layout, in one generate_batch; cost over the
    same requests without adapters and over plain LoRA, in one run.

        .venv/bin/python benchmarks/bench_multi_lora.py --layouts [--n 4] [--steps 5] [--repeats 2]
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", action="store_true")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    import impasto
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    from impasto.tiny import build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        build_random_model(model, seed=0, unet_config=UNET)
        engine = impasto.Engine.from_pretrained(model, slots_per_bucket=args.n)
        configs = layout_configs()
        for layout, config in configs.items():
            for i in range(args.n):
                torch.manual_seed(i)
                peft_model = get_peft_model(UNet2DConditionModel.from_pretrained(model, subfolder="unet"), config)
                with torch.no_grad():  # small random factors: a trained adapter's size, not zeros
                    for name, p in peft_model.named_parameters():
                        if any(k in name for k in ("lora_A", "lora_B", "hada_", "lokr_")):
                            p.copy_(torch.randn_like(p) * 0.05)
                folder = os.path.join(tmp, f"{layout}{i}")
                peft_model.save_pretrained(folder)
                engine.adapters.register(f"{layout}{i}", folder)
        print(f"config: UNet {UNET}, {args.n} requests each naming its own adapter, PEFT files: "
              + "; ".join(f"{k}: {type(c).__name__} r={c.r} on {sorted(c.target_modules)}" for k, c in configs.items())
              + f"; DDIM, cfg 7.5, {args.steps} steps, {args.size}x{args.size} px, float32, "
              f"{torch.get_num_threads()} threads, median of {args.repeats} after a warm-up")

        def run(layout):
            reqs = [impasto.Request(f"a red star number {i}", adapters=[f"{layout}{i}"] if layout else [], seed=i,
                                    steps=args.steps, height=args.size, width=args.size, output_type="np")
                    for i in range(args.n)]
            t, c = time.perf_counter(), time.process_time()
            outs = engine.generate_batch(reqs)
            assert all(o.error is None for o in outs), [o.error for o in outs]
            return time.perf_counter() - t, time.process_time() - c

        layouts = [None, *configs]
        for layout in layouts:
            run(layout)  # warm-up
        times = {layout: [] for layout in layouts}
        for _ in range(args.repeats):  # interleaved, so load drift hits every layout alike
            for layout in layouts:
                times[layout].append(run(layout))
        # process CPU time: what the layout costs, less sensitive than wall time to other processes
        wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
        print("\n| layout | img/s (wall) | CPU s per batch | cost over no adapters (CPU ratio) | cost over plain LoRA "
              "(CPU ratio) | over no adapters (wall ratio) |")
        print("|---|---|---|---|---|---|")
        print(f"| none | {args.n / wall[None]:.2f} | {cpu[None]:.2f} | 1.00x | - | 1.00x |")
        for layout in configs:
            print(f"| {layout} | {args.n / wall[layout]:.2f} | {cpu[layout]:.2f} | {cpu[layout] / cpu[None]:.2f}x | "
                  f"{cpu[layout] / cpu['lora']:.2f}x | {wall[layout] / wall[None]:.2f}x |")


if __name__ == "__main__":
    layouts_main() if "--layouts" in sys.argv[1:] else main()
