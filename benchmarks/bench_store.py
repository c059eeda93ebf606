"""Adapter store: cold swap latency on an SD-1.5-shaped base, and a Zipf request stream (issue 7 §3).

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/bench_store.py \
        [--rank1 1000] [--kv 300] [--lora 300] [--requests 2000] [--adapters 500] [--batch 16]

(a) cold swap. Base: `UNet2DConditionModel(sample_size=64, cross_attention_dim=768)` (SD 1.5's UNet:
    block_out_channels 320/640/1280/1280; diffusers' default cross_attention_dim is 1280, not SD 1.5's), built on the meta device and
    materialized with `to_empty` (uninitialized memory; only names and shapes are used), except the
    attn2 to_k/to_v weights, filled from a seeded normal so the rank1 fingerprint is deterministic.
    Driven directly: `AdapterStore(unet, host_cache_bytes=0, dtype=float32)` + `LoraRuntime(unet,
    device="cpu", dtype=float32)` (not a full Engine: there is no SD 1.5 folder here).
    Library written by the benchmark: rank1 via `write_rank1` (fp32), kv via `write_kv` of a
    random factored KvFile (rank 50, fp16), attention LoRA (to_q/k/v/out.0 of every attn1 and attn2)
    as PEFT-keyed safetensors (`unet.<module>.lora_A.weight` / `lora_B.weight`, fp16), ranks cycling
    4, 8, 16, 32, 64.
    "cold" = not in the host cache (host_cache_bytes=0 evicts after every load), file in the OS page
    cache (every file is read once before timing). What is timed:
      rank1, kv: `store.load(name)` (read + validate into the in-memory plan objects; their "slot"
                 is the plan, built per batch from these objects);
      lora:      `store.load(name)` + `runtime.load(name, file, pinned=set())` (copy into the slot
                 pool of its rank bucket; pools allocated before timing).
    Floor column: `safetensors.torch.load_file(path)` of the same file (raw read from page cache).
    diffusers+PEFT: `unet.load_lora_adapter(path, prefix="unet", adapter_name=...)` on the same LoRA
    files, `unet.delete_adapters(...)` between (not timed).
    Registration: `store.register(name, path)` per file, reported per 1,000 files per family.
(b) request stream on the tiny model (`build_random_model(dir, seed=0)`), run in two subprocesses
    (one per side, so peak RSS is separate). See `stream_side`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

import numpy as np
import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_RANKS = (4, 8, 16, 32, 64)
KV_RANK = 50


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def attention_modules(unet):
    return [n for n, _ in unet.named_modules() if n.endswith((".attn1", ".attn2"))]


_TEMPLATES: dict = {}


def write_lora(path, unet, rank, seed, dtype):
    """PEFT-keyed UNet LoRA on every attention's q/k/v/out (alpha absent -> scale 1 on both sides).

    Random values are drawn once per (rank, dtype) and each file is that template times a per-file
    factor (1 + seed * 1e-4): drawing fresh randoms for GBs of files is slow on 2 cores, and the
    values do not affect the timings."""
    from safetensors.torch import save_file

    key = (id(unet), rank, dtype)
    if key not in _TEMPLATES:
        g = torch.Generator().manual_seed(rank)
        mods = dict(unet.named_modules())
        tensors = {}
        for att in attention_modules(unet):
            for t in LORA_TARGETS:
                lin = mods[f"{att}.{t}"]
                k, n = lin.in_features, lin.out_features
                tensors[f"unet.{att}.{t}.lora_A.weight"] = torch.randn(rank, k, generator=g) / k ** 0.5
                tensors[f"unet.{att}.{t}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.01
        _TEMPLATES[key] = tensors
    f = 1.0 + seed * 1e-4
    save_file({k: (v * f).to(dtype) for k, v in _TEMPLATES[key].items()}, path)
    return os.path.getsize(path)


# ------------------------------------------------------------------------------------ (a)
def sd15_unet():
    from diffusers import UNet2DConditionModel

    from impasto.adapters.rank1 import attn2_projections

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5 (the default is 1280)
    unet = unet.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for k, v in attn2_projections(unet).values():
        for w in (k, v):
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return unet


def build_library(folder, unet, n_rank1, n_kv, n_lora):
    from impasto.adapters import kv as kvf
    from impasto.adapters import rank1 as r1

    fp = r1.fingerprint(unet)
    shapes = r1.base_shapes(unet)
    g = torch.Generator().manual_seed(1)
    lib = {"rank1": [], "kv": [], "lora": []}
    sizes = {"rank1": 0, "kv": 0, "lora": 0}
    for i in range(n_rank1):
        p = os.path.join(folder, f"r{i}.rank1.safetensors")
        layers = {m: (torch.randn(ks[0], generator=g), torch.randn(vs[0], generator=g)) for m, (ks, vs) in shapes.items()}
        r1.write_rank1(p, layers=layers, i_star=torch.randn(768, generator=g), token_embedding=torch.randn(768, generator=g),
                       placeholder=f"<r{i}>", super_word="dog", beta=0.7, tau=0.15, fingerprint=fp)
        lib["rank1"].append((f"r{i}", p))
        sizes["rank1"] += os.path.getsize(p)
    base = kvf.base_kv_weights(unet)
    tmpl = {m: [torch.randn(*s, generator=g) * 0.01 for s in ((wk.shape[0], KV_RANK), (KV_RANK, wk.shape[1]))] * 2
            for m, (wk, wv) in base.items()}  # random factors drawn once; per file times (1 + i * 1e-4)
    for i in range(n_kv):
        p = os.path.join(folder, f"k{i}.kv.safetensors")
        f = 1.0 + i * 1e-4
        layers = {m: kvf.KvLayer(k_factors=(t[0] * f, t[1]), v_factors=(t[2], t[3] * f)) for m, t in tmpl.items()}
        sizes["kv"] += kvf.write_kv(p, kvf.KvFile(path=p, format="kv", layers=layers, tokens={f"<k{i}>": torch.randn(768, generator=g)}))
        lib["kv"].append((f"k{i}", p))
    for i in range(n_lora):
        p = os.path.join(folder, f"l{i}.safetensors")
        rank = LORA_RANKS[i % len(LORA_RANKS)]
        sizes["lora"] += write_lora(p, unet, rank, 1000 + i, torch.float16)
        lib["lora"].append((f"l{i}", p))
    return lib, sizes


def page_cache(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def cold_swap(args, tmp):
    from safetensors.torch import load_file

    from impasto.adapters.lora import LoraRuntime
    from impasto.adapters.store import AdapterStore

    t = time.perf_counter()
    unet = sd15_unet()
    t_unet = time.perf_counter() - t
    t = time.perf_counter()
    lib, sizes = build_library(tmp, unet, args.rank1, args.kv, args.lora)
    t_lib = time.perf_counter() - t
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"(a) base: UNet2DConditionModel(cross_attention_dim=768, sample_size=64) = SD 1.5 ({n_params / 1e6:.0f} M params, meta -> to_empty, "
          f"attn2 k/v seeded) built in {t_unet:.1f} s; library written in {t_lib:.0f} s:")
    for fam in ("rank1", "kv", "lora"):
        n = len(lib[fam])
        print(f"    {fam}: {n} files, {sizes[fam] / 1e6:.0f} MB ({sizes[fam] / max(n, 1) / 1e6:.3f} MB avg)")
    print(f"    total {sum(sizes.values()) / 1e9:.2f} GB; LoRA ranks cycle {LORA_RANKS}, fp16, {len(attention_modules(unet))} "
          f"attention modules x {LORA_TARGETS}; kv rank {KV_RANK} fp16; rank1 fp32")

    store = AdapterStore(unet, host_cache_bytes=0, max_rank=64, dtype=torch.float32)
    _ = store.fingerprint
    reg = {}
    for fam in ("rank1", "kv", "lora"):
        ts = []
        for name, p in lib[fam]:
            t = time.perf_counter()
            store.register(name, p)
            ts.append(time.perf_counter() - t)
        reg[fam] = ts
    runtime = LoraRuntime(unet, slots_per_bucket=args.slots, max_adapters_per_row=4, device="cpu", dtype=torch.float32)
    store.runtimes = (runtime,)
    for fam in ("rank1", "kv", "lora"):
        page_cache([p for _, p in lib[fam]])
    # allocate every bucket's pools (first load of a bucket allocates zeros for all its modules)
    for name, p in lib["lora"][: len(LORA_RANKS)]:
        runtime.load(name, store.load(name), pinned=set())

    res = {}
    for fam in ("rank1", "kv", "lora"):
        floor, load, slot, total = [], [], [], []
        for name, p in lib[fam]:
            t0 = time.perf_counter()
            load_file(p)
            t1 = time.perf_counter()
            obj = store.load(name)
            t2 = time.perf_counter()
            if fam == "lora":
                runtime.load(name, obj, pinned=set())
            t3 = time.perf_counter()
            floor.append(t1 - t0)
            load.append(t2 - t1)
            slot.append(t3 - t2)
            total.append(t3 - t1)
            assert store.resident_bytes()["host"] == 0
        res[fam] = dict(floor=floor, load=load, slot=slot, total=total)

    # per-rank LoRA breakdown
    by_rank = {}
    for (name, p), tt, ld, sl in zip(lib["lora"], res["lora"]["total"], res["lora"]["load"], res["lora"]["slot"]):
        by_rank.setdefault(store.info(name).rank, []).append((tt, ld, sl, os.path.getsize(p)))

    # diffusers + PEFT on the same LoRA files
    dif = []
    dif_by_rank = {}
    for name, p in lib["lora"]:
        t = time.perf_counter()
        unet.load_lora_adapter(p, prefix="unet", adapter_name=name)
        d = time.perf_counter() - t
        unet.delete_adapters(name)
        dif.append(d)
        dif_by_rank.setdefault(store.info(name).rank, []).append(d)

    # where a rank1 / kv load goes: the store's per-load base_shapes / base_kv_weights walk
    from impasto.adapters import kv as kvf
    from impasto.adapters import rank1 as r1

    walk = []
    for _ in range(20):
        t = time.perf_counter()
        r1.base_shapes(unet)
        walk.append(time.perf_counter() - t)
    walk_kv = []
    for _ in range(20):
        t = time.perf_counter()
        kvf.base_kv_weights(unet)
        walk_kv.append(time.perf_counter() - t)

    ms = 1e3
    print("\n(a) cold swap, ms (file in page cache, not in host cache -> ready); p50 / p99 over all files of the family")
    print("| family | files | MB/file | raw read floor p50 | store.load p50 | slot copy p50 | **cold swap p50** | cold swap p99 | target p50 | diffusers+PEFT load_lora_adapter p50 / p99 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    targets = {"rank1": 2.0, "kv": 20.0, "lora": None}
    for fam in ("rank1", "kv", "lora"):
        r = res[fam]
        mb = sizes[fam] / len(lib[fam]) / 1e6
        tgt = targets[fam]
        p50 = pct(r["total"], 50) * ms
        tgt_s = "-" if tgt is None else (f"≤ {tgt:g}: met" if p50 <= tgt else f"≤ {tgt:g}: MISSED by {p50 - tgt:.1f} ms ({p50 / tgt:.1f}x)")
        d = f"{pct(dif, 50) * ms:.1f} / {pct(dif, 99) * ms:.1f}" if fam == "lora" else "-"
        print(f"| {fam} | {len(lib[fam])} | {mb:.3f} | {pct(r['floor'], 50) * ms:.2f} | {pct(r['load'], 50) * ms:.2f} | "
              f"{pct(r['slot'], 50) * ms:.2f} | **{p50:.2f}** | {pct(r['total'], 99) * ms:.2f} | {tgt_s} | {d} |")
    print("\n(a) LoRA by rank, ms p50 (n files each)")
    print("| rank | n | MB/file (fp16) | impasto cold swap | of which store.load | of which slot copy | diffusers+PEFT load_lora_adapter | diffusers / impasto |")
    print("|---|---|---|---|---|---|---|---|")
    for rank in sorted(by_rank):
        v = by_rank[rank]
        tt = statistics.median(x[0] for x in v) * ms
        dd = statistics.median(dif_by_rank[rank]) * ms
        print(f"| {rank} | {len(v)} | {v[0][3] / 1e6:.1f} | {tt:.1f} | {statistics.median(x[1] for x in v) * ms:.1f} | "
              f"{statistics.median(x[2] for x in v) * ms:.1f} | {dd:.1f} | {dd / tt:.1f}x |")
    print("\n(a) registration (header read + validation against the base), per 1,000 files")
    print("| family | files | ms per 1,000 files (mean) | p50 ms/file | p99 ms/file |")
    print("|---|---|---|---|---|")
    for fam in ("rank1", "kv", "lora"):
        ts = reg[fam]
        print(f"| {fam} | {len(ts)} | {sum(ts) / len(ts) * 1e6:.0f} | {pct(ts, 50) * ms:.2f} | {pct(ts, 99) * ms:.2f} |")
    print(f"\n(a) breakdown helpers: rank1_format.base_shapes(unet) (the store walks it once and caches it) p50 "
          f"{pct(walk, 50) * ms:.2f} ms; kv_format.base_kv_weights(unet) (also cached) p50 "
          f"{pct(walk_kv, 50) * ms:.2f} ms; slot pools {runtime.nbytes() / 1e6:.0f} MB ({args.slots} slots per bucket)")


# ------------------------------------------------------------------------------------ (b)
def zipf_requests(n, n_adapters, a, seed):
    """numpy `Generator.zipf(a)` truncated to [1, n_adapters] by rejection; rank k -> a fixed random adapter."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_adapters)
    out = []
    while len(out) < n:
        k = int(rng.zipf(a))
        if k <= n_adapters:
            out.append(int(perm[k - 1]))
    return out


def stream_side(args):
    """One side of (b) in its own process; prints one JSON line."""
    cfg = json.loads(args.stream_side)
    side, model, paths, reqs = cfg["side"], cfg["model"], cfg["paths"], cfg["requests"]
    budget, steps, size, batch = cfg["budget"], cfg["steps"], cfg["size"], cfg["batch"]
    torch.set_num_threads(cfg["threads"])
    prompts = [f"a photo of thing {i}" for i in range(len(reqs))]
    lat, loads = [], 0
    breakdown = {}
    if side == "impasto":
        import impasto

        engine = impasto.Engine.from_pretrained(model, host_cache_bytes=budget, slots_per_bucket=cfg["slots"])
        for i, p in enumerate(paths):
            engine.adapters.register(f"a{i}", p)
        engine.generate_batch([impasto.Request("warm", adapters=["a0"], seed=0, steps=steps, height=size, width=size,
                                               guidance=7.5, output_type="np")])
        t_all = time.perf_counter()
        for s in range(0, len(reqs), batch):
            chunk = range(s, min(s + batch, len(reqs)))
            rs = [impasto.Request(prompts[i], adapters=[f"a{reqs[i]}"], seed=i, steps=steps, height=size, width=size,
                                  guidance=7.5, output_type="np") for i in chunk]
            t = time.perf_counter()
            outs = engine.generate_batch(rs)
            w = time.perf_counter() - t
            assert all(o.error is None for o in outs), [o.error for o in outs if o.error][:1]
            lat += [w] * len(rs)
            for k, v in (outs[0].timings or {}).items():
                if isinstance(v, (int, float)):
                    breakdown[k] = breakdown.get(k, 0.0) + v
        wall = time.perf_counter() - t_all
        resident = engine.adapters.resident_bytes()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        nbytes = [os.path.getsize(p) for p in paths]
        lru: OrderedDict = OrderedDict()
        t_load = t_evict = t_set = 0.0

        def call(i, name):
            pipe(prompts[i], num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(i), output_type="np")

        pipe.load_lora_weights(paths[0], adapter_name="warm")
        pipe.set_adapters(["warm"])
        call(0, "warm")
        pipe.delete_adapters("warm")
        t_all = time.perf_counter()
        for i, a in enumerate(reqs):
            name = f"a{a}"
            t = time.perf_counter()
            if name in lru:
                lru.move_to_end(name)
            else:
                t1 = time.perf_counter()
                pipe.load_lora_weights(paths[a], adapter_name=name)
                t_load += time.perf_counter() - t1
                loads += 1
                lru[name] = nbytes[a]
                t1 = time.perf_counter()
                while sum(lru.values()) > budget and len(lru) > 1:
                    old, _ = lru.popitem(last=False)
                    pipe.delete_adapters(old)
                t_evict += time.perf_counter() - t1
            t1 = time.perf_counter()
            pipe.set_adapters([name])
            t_set += time.perf_counter() - t1
            call(i, name)
            lat.append(time.perf_counter() - t)
        wall = time.perf_counter() - t_all
        breakdown = dict(load_lora_weights=t_load, delete_adapters=t_evict, set_adapters=t_set,
                         pipe_calls=wall - t_load - t_evict - t_set)
        resident = {"loaded_adapters": len(lru)}
    print(json.dumps(dict(side=side, wall=wall, lat=lat, loads=loads, breakdown=breakdown, resident=resident,
                          maxrss_kb=peak_rss_kb())))


def peak_rss_kb():
    """This process's peak RSS: VmHWM (per address space, reset at exec). ru_maxrss is not used: on
    Linux a child started by fork+exec reports the parent's peak when that is larger."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def stream(args, tmp):
    from diffusers import UNet2DConditionModel

    from impasto.tiny import build_random_model

    model = build_random_model(os.path.join(tmp, "tiny"), seed=0)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    ldir = os.path.join(tmp, "tiny_loras")
    os.makedirs(ldir)
    paths = []
    for i in range(args.adapters):
        p = os.path.join(ldir, f"a{i}.safetensors")
        write_lora(p, unet, 4, 5000 + i, torch.float32)
        paths.append(p)
    page_cache(paths)
    nb = os.path.getsize(paths[0])
    budget = args.budget_adapters * nb
    reqs = zipf_requests(args.requests, args.adapters, args.zipf_a, seed=0)
    distinct = len(set(reqs))
    cfg = dict(model=model, paths=paths, requests=reqs, budget=budget, steps=args.steps, size=args.size,
               batch=args.batch, slots=args.slots_stream, threads=args.threads)
    print(f"\n(b) stream: tiny model (build_random_model seed 0, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M UNet "
          f"params); {args.adapters} rank-4 attention LoRA files (q/k/v/out of {len(attention_modules(unet))} attention "
          f"modules, fp32, {nb / 1e3:.1f} KB each); {args.requests} requests, adapter ~ numpy zipf(a={args.zipf_a}) "
          f"truncated to {args.adapters} by rejection ({distinct} distinct adapters drawn, top adapter "
          f"{max(reqs.count(x) for x in set(reqs))} requests); one adapter per request, weight 1; {args.steps} DDIM steps, "
          f"{args.size}x{args.size} px, cfg 7.5, seed = request index, output np; byte budget {budget / 1e6:.2f} MB = "
          f"{args.budget_adapters} adapter files (impasto host_cache_bytes; diffusers LRU of loaded adapters by file "
          f"bytes); impasto generate_batch over consecutive batches of {args.batch}, slots_per_bucket {args.slots_stream}; "
          f"{args.threads} torch threads; each side in its own subprocess (sequentially)")
    out = {}
    for side in ("impasto", "diffusers"):
        cfg["side"] = side
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--stream-side", json.dumps(cfg)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:])
            raise SystemExit(f"{side} side failed")
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
        o = out[side]  # printed as each side ends: a long run keeps what it measured
        print(f"  {side} side done: {len(o['lat'])} requests in {o['wall']:.1f} s, peak RSS {o['maxrss_kb'] / 1024:.0f} MB",
              flush=True)
    print("\n(b) stream results (latency = service time of the request: its batch's generate_batch wall time for "
          "impasto, its load + set_adapters + pipeline call for diffusers+PEFT; no queueing)")
    print("| side | requests | wall s | throughput req/s | p50 latency ms | p99 latency ms | peak RSS MB | adapter loads |")
    print("|---|---|---|---|---|---|---|---|")
    for side, label in (("impasto", f"impasto (batch {args.batch})"), ("diffusers", "diffusers+PEFT (LRU, set_adapters)")):
        o = out[side]
        print(f"| {label} | {len(o['lat'])} | {o['wall']:.1f} | {len(o['lat']) / o['wall']:.2f} | {pct(o['lat'], 50) * 1e3:.0f} | "
              f"{pct(o['lat'], 99) * 1e3:.0f} | {o['maxrss_kb'] / 1024:.0f} | {o['loads'] if side == 'diffusers' else '-'} |")
    ratio = out["diffusers"]["wall"] / out["impasto"]["wall"]
    print(f"\nthroughput impasto / diffusers+PEFT = {ratio:.2f}x (target ≥ 3x: {'met' if ratio >= 3 else f'MISSED, {3 / ratio:.2f}x short'})")
    print(f"impasto timings summed over batches (s): {json.dumps({k: round(v, 2) for k, v in out['impasto']['breakdown'].items()})}; "
          f"resident at end: {out['impasto']['resident']}")
    print(f"diffusers+PEFT time split (s): {json.dumps({k: round(v, 2) for k, v in out['diffusers']['breakdown'].items()})}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank1", type=int, default=1000)
    ap.add_argument("--kv", type=int, default=300)
    ap.add_argument("--lora", type=int, default=300)
    ap.add_argument("--slots", type=int, default=4, help="(a) slots per rank bucket")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--adapters", type=int, default=500)
    ap.add_argument("--zipf-a", type=float, default=1.1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--slots-stream", type=int, default=32)
    ap.add_argument("--budget-adapters", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", choices=["a", "b"], default=None)
    ap.add_argument("--stream-side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream_side:
        return stream_side(args)
    torch.set_num_threads(args.threads)
    import diffusers
    import peft

    print(f"config: {vars(args)}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
          f"{os.cpu_count()} CPUs, float32 compute, no grad")
    with torch.no_grad(), tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if args.skip != "a":
            cold_swap(args, tmp)
        if args.skip != "b":
            stream(args, tmp)


if __name__ == "__main__":
    main()
