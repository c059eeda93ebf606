"""The conditioning plan: attn2 K/V computed once per (request, branch) vs every step.

    .venv/bin/python benchmarks/bench_conditioning.py [--repeats 5]

On the medium, SD-1.5-shaped CPU config (research env.md §4: block_out_channels
(64, 128, 256, 256), 2 layers per block, cross_attention_dim 256, 32×32 latents), side by side:
  * plan cost per request: text encoding + every attn2 K/V for its 2 branches (uncond, cond);
  * one UNet step (batch 2 = one CFG request) reading planned K/V vs recomputing to_k/to_v
    (diffusers' way), same weights and inputs;
then, by arithmetic, the FLOPs and bytes the plan saves for SD 1.5 at 512 px over 30 steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

MEDIUM = dict(
    block_out_channels=(64, 128, 256, 256),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=256,
    attention_head_dim=8,
    sample_size=32,
    norm_num_groups=32,
)


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def sd15_arithmetic(steps=30, rows_per_request=2):
    """attn2 K/V work per row per step for SD 1.5: 16 layers, Σh = 12,480, D = 768, L = 77."""
    sum_h, D, L = 12_480, 768, 77
    flops_row_step = 2 * (2 * L * D * sum_h)  # K and V, 2 FLOPs per MAC
    weight_bytes = 2 * D * sum_h * 2  # fp16 W_K and W_V of every layer, read once per forward
    kv_bytes_row = 2 * L * sum_h * 2  # fp16 K and V written per row
    per_request = rows_per_request * flops_row_step
    return dict(
        flops_row_step=flops_row_step,
        flops_saved=per_request * (steps - 1),
        weight_bytes_step=weight_bytes,
        bytes_saved=(weight_bytes + rows_per_request * kv_bytes_row) * (steps - 1),
        cache_bytes=rows_per_request * kv_bytes_row,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import impasto
    from impasto.plan import Branch, build_plan
    from impasto.tiny import build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_random_model(os.path.join(tmp, "m"), seed=0, unet_config=MEDIUM)
        eng = impasto.Engine.from_pretrained(path)
        unet, base = eng.base.unet, eng.base
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        branches = [Branch(""), Branch("a red star on a blue background")]
        plan_ms = _median_ms(
            lambda: build_plan(branches, base, eng.attn2, eng.lora, eng.adapters, {}, "cpu", torch.float32),
            args.repeats,
        )
        plan = build_plan(branches, base, eng.attn2, eng.lora, eng.adapters, {}, "cpu", torch.float32)
        x = torch.randn(2, 4, 32, 32)
        emb = plan.embeds
        kv = plan.kv

        eng.state.write_layout([(emb, kv)])  # the batch state the step reads: these 2 rows

        def step(planned):
            eng.state.planned = planned
            try:
                with torch.inference_mode():
                    return unet(x, 500, encoder_hidden_states=emb).sample
            finally:
                eng.state.planned = False

        torch.testing.assert_close(step(True), step(False), rtol=1e-4, atol=1e-4)
        planned = _median_ms(lambda: step(True), args.repeats)
        recompute = _median_ms(lambda: step(False), args.repeats)
        sum_h = sum(a.to_k.out_features for a in eng.attn2.values())
        D = unet.config.cross_attention_dim
        kv_mflop = 2 * 2 * 2 * 77 * D * sum_h / 1e6  # 2 rows, K and V
        print(f"config: medium UNet {params:.1f} M params, {len(eng.attn2)} attn2 layers (sum h = {sum_h}, "
              f"D = {D}), 32x32 latents, batch 2 (one CFG request), float32, {torch.get_num_threads()} threads, "
              f"median of {args.repeats}")
        print("\n| measure | value |\n|---|---|")
        print(f"| plan per request (text encoding + attn2 K/V, 2 branches) | {plan_ms:.1f} ms |")
        print(f"| UNet step, K/V recomputed (diffusers) | {recompute:.1f} ms |")
        print(f"| UNet step, K/V from the plan | {planned:.1f} ms |")
        print(f"| saved per step | {recompute - planned:.1f} ms ({(recompute - planned) / recompute:.1%}); "
              f"{kv_mflop:.0f} MFLOP of K/V projections |")
        print(f"| 30 steps: plan once vs recompute | {plan_ms + 30 * planned:.0f} ms vs "
              f"{plan_ms + 30 * recompute:.0f} ms ({(plan_ms + 30 * recompute) / (plan_ms + 30 * planned):.3f}x) |")
        a = sd15_arithmetic()
        print("\nSD 1.5, 512 px, 30 steps, one CFG request (2 rows), fp16:")
        print(f"| attn2 K/V FLOPs per row per step | {a['flops_row_step'] / 1e9:.2f} GFLOP |")
        print(f"| FLOPs saved per request (29 of 30 steps) | {a['flops_saved'] / 1e9:.1f} GFLOP |")
        print(f"| W_K/W_V bytes read per step | {a['weight_bytes_step'] / 1e6:.1f} MB |")
        print(f"| bytes saved per request (weights + K/V writes, 29 steps) | {a['bytes_saved'] / 1e9:.2f} GB |")
        print(f"| cached K/V per request | {a['cache_bytes'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
