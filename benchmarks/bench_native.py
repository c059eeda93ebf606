"""Kernel micro-benchmarks: every backend of lora_apply, guidance_blend and rank1_edit side by side,
plus PEFT's per-adapter loop for LoRA, at SD 1.5 shapes, as ratios to the reference.

On CPU this decides `dispatch.NATIVE_CPU_DEFAULT` (the native kernel becomes the CPU default
only where it is faster than the reference). On CUDA (benchmarks/gpu_check.sh) it adds Triton,
times with CUDA events, and reports each setup's roofline: FLOPs and minimum bytes, the time the
device's peak (--peak-tflops, --peak-tbs) allows, and the fraction of it achieved.

    .venv/bin/python benchmarks/bench_native.py                  # CPU, builds the extension once
    python3 benchmarks/bench_native.py --device cuda --json out.json
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch

from impasto.kernels import build_branch_table, guidance_blend, lora_apply, lora_meta, native, rank1_edit
from impasto.kernels.guidance import RequestBranches


@dataclasses.dataclass
class Result:
    op: str
    setup: str
    dtype: str
    times_ms: dict  # provider -> median ms
    flops: float
    bytes: float

    def ratios(self) -> dict:
        ref = self.times_ms.get("reference")
        return {k: ref / v for k, v in self.times_ms.items() if ref and v}


def _timer(device: str, repeats: int):
    def cpu(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def cuda(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    return cuda if device == "cuda" else cpu


def _providers(device: str) -> list[str]:
    out = ["reference"]
    if not native.reasons(device):
        out.append("native")
    if device == "cuda":
        out.append("triton")
    return out


def peft_loop(y, x, A_pool, B_pool, slots, scales):
    """PEFT's mixed batch (`_mixed_batch_forward`): one x[rows] @ A @ B per distinct adapter."""
    ids = slots[:, 0].tolist()
    for slot in sorted(set(ids) - {-1}):
        rows = [i for i, s in enumerate(ids) if s == slot]
        y[rows] += (x[rows] @ A_pool[slot]) @ B_pool[slot] * scales[rows, 0][:, None, None].to(y.dtype)


def bench_lora(device, dtype, timer, rows, T, dim, R, adapters) -> Result:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, T, dim, generator=gen).to(device, dtype)
    A = (torch.randn(adapters, dim, R, generator=gen) / dim**0.5).to(device, dtype)
    B = (torch.randn(adapters, R, dim, generator=gen) / R**0.5).to(device, dtype)
    slots = (torch.arange(rows) % adapters).int()[:, None].to(device)
    scales = torch.full((rows, 1), 0.5, device=device)
    meta = lora_meta(slots, adapters)
    y0 = torch.zeros(rows, T, dim, dtype=dtype, device=device)
    y = y0.clone()  # the timed calls accumulate into y; checks start from y0
    want = y0.clone()
    lora_apply(want, x, A, B, slots, scales, meta=meta, backend="reference")
    times = {}
    for p in _providers(device):
        got = y0.clone()
        lora_apply(got, x, A, B, slots, scales, meta=meta, backend=p)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        times[p] = timer(lambda: lora_apply(y, x, A, B, slots, scales, meta=meta, backend=p))
    times["peft_loop"] = timer(lambda: peft_loop(y, x, A, B, slots, scales))
    el = torch.finfo(dtype).bits // 8
    return Result("lora_apply", f"rows={rows} T={T} K=N={dim} R={R} adapters={adapters}", str(dtype).split(".")[-1],
                  times, 2.0 * rows * T * R * 2 * dim, el * (rows * T * 3 * dim + adapters * 2 * R * dim))


def bench_guidance(device, dtype, timer, images, styles, rescale, hw=64) -> Result:
    reqs, start = [], 0
    for _ in range(images):
        reqs.append(RequestBranches(start=start, images=1, cfg=7.5, has_uncond=True,
                                    style_weights=(2.0,) * styles, rescale=rescale))
        start += 2 + styles
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(start, 4, hw, hw, generator=gen).to(device, dtype)
    table = build_branch_table(reqs, device=device)
    out = torch.empty(images, 4, hw, hw, dtype=dtype, device=device)
    want = guidance_blend(noise, table, backend="reference")
    times = {}
    for p in _providers(device):
        torch.testing.assert_close(guidance_blend(noise, table, backend=p).float(), want.float(), rtol=2e-2, atol=2e-2)
        times[p] = timer(lambda: guidance_blend(noise, table, out=out, backend=p))
    L, el = 4 * hw * hw, torch.finfo(dtype).bits // 8
    return Result("guidance_blend", f"latents={images} 4x{hw}x{hw} styles={styles} rescale={rescale}",
                  str(dtype).split(".")[-1], times, images * L * (3 + 3 * styles) * (2 if rescale else 1),
                  el * L * (start + images))


def bench_rank1(device, dtype, timer, rows, T=77, D=768, N=320, M=2) -> Result:
    gen = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device, dtype)

    base, e = rnd(rows, T, N), rnd(rows, T, D)
    P, G = rnd(rows, M, D, scale=D**-0.5), rnd(rows, M, D, scale=0.5 * D**-0.5)
    WU, O = rnd(rows, M, N), rnd(rows, M, N)
    beta = torch.full((rows, M), 0.5, device=device)
    tau = torch.full((rows, M), 0.2, device=device)
    args = (base, e, P, WU, G, O, beta, tau)
    want = rank1_edit(*args, backend="reference")
    times = {}
    for p in _providers(device):
        torch.testing.assert_close(rank1_edit(*args, backend=p).float(), want.float(), rtol=2e-2, atol=2e-2)
        times[p] = timer(lambda: rank1_edit(*args, backend=p))
    el = torch.finfo(dtype).bits // 8
    return Result("rank1_edit", f"rows={rows} T={T} D={D} N={N} M={M}", str(dtype).split(".")[-1], times,
                  2.0 * rows * T * 2 * M * (D + N), el * rows * T * (D + 2 * N))


def main(argv=None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtypes", default=None, help="comma list; default float32,bfloat16 (CPU), +float16 (CUDA)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per provider (median); default 5 CPU, 50 CUDA")
    ap.add_argument("--quick", action="store_true", help="one shape per op")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device peak, dense 16-bit TFLOP/s (H100/H200)")
    ap.add_argument("--peak-tbs", type=float, default=4.8, help="device peak memory TB/s (H200 HBM3e; H100 SXM 3.35)")
    ap.add_argument("--json", help="write every result here")
    args = ap.parse_args(argv)
    device = args.device
    if device == "cpu" and not native.loaded() and not native.load():
        native.build()
    dtypes = args.dtypes.split(",") if args.dtypes else (["float32", "bfloat16"] + (["float16"] if device == "cuda" else []))
    repeats = args.repeats or (50 if device == "cuda" else 5)
    timer = _timer(device, repeats)
    T = 1024 if device == "cpu" else 4096  # 32x32 latents on CPU, SD 1.5's 64x64 on a GPU
    lora_shapes = [(8, T, 320, 16, 8)] if args.quick else [(8, T, 320, 16, 8), (8, T, 320, 16, 1), (8, T // 4, 640, 16, 8), (8, T // 16, 1280, 64, 8)]
    results = []
    print(f"# {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats}, native: {native.origin()}")
    for name in dtypes:
        dtype = getattr(torch, name)
        for s in lora_shapes:
            results.append(bench_lora(device, dtype, timer, *s))
        for g in ([(8, 0, 0.0)] if args.quick else [(8, 0, 0.0), (8, 2, 0.7)]):
            results.append(bench_guidance(device, dtype, timer, *g))
        for rows in ([16] if args.quick else [16, 64]):
            results.append(bench_rank1(device, dtype, timer, rows))
    print("| op | setup | dtype | " + " | ".join(["ms per provider", "x vs reference", "roofline us", "of roofline"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        roof_us = max(r.flops / (args.peak_tflops * 1e12), r.bytes / (args.peak_tbs * 1e12)) * 1e6
        best = min(v for k, v in r.times_ms.items() if k != "peft_loop")
        ms = ", ".join(f"{k} {v:.3f}" for k, v in r.times_ms.items())
        ratios = ", ".join(f"{k} {v:.2f}x" for k, v in r.ratios().items() if k != "reference")
        print(f"| {r.op} | {r.setup} | {r.dtype} | {ms} | {ratios} | {roof_us:.1f} | {roof_us / (best * 1e3):.1%} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(dataclasses.asdict(r), ratios=r.ratios()) for r in results], f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
