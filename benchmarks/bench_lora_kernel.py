"""lora_apply on CPU: the vectorized reference path versus PEFT's per-adapter loop, on UNet shapes.

The loop is PEFT's mixed-batch forward (peft/tuners/lora/layer.py `_mixed_batch_forward`): for
each distinct adapter, index its rows, run x @ A @ B on them and add. The reference path gathers
every row's weights and runs two batched matmuls (impasto.kernels.lora, backend "reference").

Every setup also prints its FLOPs and bytes: the roofline a GPU run of the Triton kernels will be
held to (bf16 operands, H100 SXM datasheet peaks: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3).

    .venv/bin/python benchmarks/bench_lora_kernel.py            # full grid, a few minutes
    .venv/bin/python benchmarks/bench_lora_kernel.py --quick    # a corner of the grid
"""

import argparse
import dataclasses
import json
import statistics
import time

import torch

from impasto.kernels import lora_apply, lora_meta

H100_BF16_FLOPS = 989e12
H100_HBM_BYTES = 3.35e12


@dataclasses.dataclass(frozen=True)
class Setup:
    K: int  # in features
    N: int  # out features
    R: int  # rank bucket
    adapters: int  # distinct adapters in the batch
    rows: int  # images in the batch
    T: int  # tokens per image (1024 = 32x32 latents)

    def flops(self) -> float:
        # shrink 2*T*K*R plus expand 2*T*R*N per row
        return 2.0 * self.rows * self.T * self.R * (self.K + self.N)

    def bytes(self, elem: int = 2) -> dict:
        """Minimum HBM traffic of one call, and the fp32 intermediate of the two-kernel design."""
        activations = self.rows * self.T * (self.K + 2 * self.N) * elem  # read x, read + write y
        weights = self.adapters * self.R * (self.K + self.N) * elem  # each adapter read once
        intermediate = 2 * self.rows * self.T * self.R * 4  # fp32 tmp written then read
        return dict(min=activations + weights, with_tmp=activations + weights + intermediate)


def peft_loop(y, x, A_pool, B_pool, slots, scales):
    """PEFT's mixed batch: one x[rows] @ A @ B per distinct adapter (one adapter per row)."""
    ids = slots[:, 0].tolist()
    for slot in sorted(set(ids) - {-1}):
        rows = [i for i, s in enumerate(ids) if s == slot]
        scale = scales[rows, 0][:, None, None]
        y[rows] += (x[rows] @ A_pool[slot]) @ B_pool[slot] * scale


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.pstdev(times)


def run(setup: Setup, repeats: int, dtype: torch.dtype, check: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    S = max(setup.adapters, 1)
    x = torch.randn(setup.rows, setup.T, setup.K, generator=gen).to(dtype)
    A_pool = (torch.randn(S, setup.K, setup.R, generator=gen) / setup.K**0.5).to(dtype)
    B_pool = (torch.randn(S, setup.R, setup.N, generator=gen) / setup.R**0.5).to(dtype)
    slots = (torch.arange(setup.rows) % setup.adapters).int()[:, None]  # [rows, M=1], round robin
    scales = torch.full((setup.rows, 1), 0.5)
    meta = lora_meta(slots, S)  # once per step, shared by every layer: not timed
    y = torch.zeros(setup.rows, setup.T, setup.N, dtype=dtype)
    if check:
        y_ref, y_loop = y.clone(), y.clone()
        lora_apply(y_ref, x, A_pool, B_pool, slots, scales, meta=meta, backend="reference")
        peft_loop(y_loop, x, A_pool, B_pool, slots, scales)
        torch.testing.assert_close(y_ref, y_loop, rtol=1e-4, atol=1e-4)
    ref = _time(lambda: lora_apply(y, x, A_pool, B_pool, slots, scales, meta=meta, backend="reference"), repeats)
    loop = _time(lambda: peft_loop(y, x, A_pool, B_pool, slots, scales), repeats)
    traffic = setup.bytes()
    roofline = max(setup.flops() / H100_BF16_FLOPS, traffic["with_tmp"] / H100_HBM_BYTES)
    return dict(
        setup=dataclasses.asdict(setup),
        reference_ms=ref[0] * 1e3,
        reference_std_ms=ref[1] * 1e3,
        loop_ms=loop[0] * 1e3,
        loop_std_ms=loop[1] * 1e3,
        gflop=setup.flops() / 1e9,
        mb_min_bf16=traffic["min"] / 1e6,
        mb_with_tmp_bf16=traffic["with_tmp"] / 1e6,
        flop_per_byte=setup.flops() / traffic["with_tmp"],
        h100_roofline_us=roofline * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K=N in {320, 1280}, R in {4, 64}, 1 and 16 adapters")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per row (1024 = 32x32 latents)")
    parser.add_argument("--rows", type=int, default=16, help="images in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--check", action="store_true", help="check the two paths agree first")
    parser.add_argument("--jsonl", help="also write one JSON line per setup here")
    args = parser.parse_args()

    dims = [320, 1280] if args.quick else [320, 640, 1280]
    ranks = [4, 64] if args.quick else [4, 16, 64, 128]
    counts = [1, 16] if args.quick else [1, 4, 16]
    dtype = getattr(torch, args.dtype)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
        f"rows {args.rows}, tokens/row {args.tokens}, M 1, median of {args.repeats} (+1 warm-up)"
    )
    print("# roofline columns: bf16 bytes; H100 SXM peaks 989 TFLOP/s bf16, 3.35 TB/s")
    header = (
        f"| {'K=N':>5} | {'R':>4} | {'adapters':>8} | {'reference ms':>12} | {'PEFT loop ms':>12} | "
        f"{'speedup':>7} | {'GFLOP':>6} | {'MB min':>7} | {'MB +tmp':>7} | {'FLOP/B':>6} | {'H100 us':>7} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    out = open(args.jsonl, "w") if args.jsonl else None
    for dim in dims:
        for R in ranks:
            for n in counts:
                r = run(Setup(dim, dim, R, n, args.rows, args.tokens), args.repeats, dtype, args.check)
                print(
                    f"| {dim:>5} | {R:>4} | {n:>8} | {r['reference_ms']:>12.2f} | {r['loop_ms']:>12.2f} | "
                    f"{r['loop_ms'] / r['reference_ms']:>6.2f}x | {r['gflop']:>6.2f} | {r['mb_min_bf16']:>7.1f} | "
                    f"{r['mb_with_tmp_bf16']:>7.1f} | {r['flop_per_byte']:>6.1f} | {r['h100_roofline_us']:>7.1f} |",
                    flush=True,
                )
                if out:
                    out.write(json.dumps(r) + "\n")
    if out:
        out.close()


if __name__ == "__main__":
    main()
