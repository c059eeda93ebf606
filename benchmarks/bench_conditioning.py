"""The conditioning plan: attn2 K/V computed once per (request, branch) vs every step.

    .venv/bin/python benchmarks/bench_conditioning.py [--repeats 5]

On the medium, SD-1.5-shaped CPU config (research env.md §4: block_out_channels
(64, 128, 256, 256), 2 layers per block, cross_attention_dim 256, 32×32 latents), side by side:
  * plan cost per request: text encoding + every attn2 K/V for its 2 branches (uncond, cond);
  * one UNet step (batch 2 = one CFG request) reading planned K/V vs recomputing to_k/to_v
    (diffusers' way), same weights and inputs;
then, by arithmetic, the FLOPs and bytes the plan saves for SD 1.5 at 512 px over 30 steps.

The image branch (encoder adapters, IP-Adapter base and Plus) likewise: the plan cost per
request (image encoder, projection, every attn2 layer's K'/V', both branches), and one UNet step
with K'/V' from the plan vs diffusers' IPAdapterAttnProcessor2_0 (which runs the projection —
the Resampler for Plus — and to_k_ip/to_v_ip inside every forward), same weights and inputs;
then the SD 1.5 arithmetic. `--image-only` runs only this part.
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


def _paired_median_ms(f, g, repeats):
    """Medians of f and g timed alternately (f, g, f, g, ...): a shared machine's load hits both alike."""
    f(), g()
    tf, tg = [], []
    for _ in range(repeats):
        for fn, times in ((f, tf), (g, tg)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(tf), 1e3 * statistics.median(tg)


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
    ap.add_argument("--image-only", action="store_true", help="only the image branch (encoder adapters)")
    args = ap.parse_args()
    if args.image_only:
        return image_branch(args)

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
    image_branch(args)


VISION = dict(hidden_size=128, intermediate_size=512, projection_dim=128, num_hidden_layers=4, num_attention_heads=4,
              image_size=64, patch_size=8)


def _ip_files(unet, folder, seed=0):
    """Random IP-Adapter files (base: 4 tokens; Plus: Resampler W 256, 4 heads, depth 4, 16 tokens)
    in the original layouts, sized for `unet`."""
    from impasto.adapters import encoder as encoder_format

    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) / shape[-1] ** 0.5  # noqa: E731
    D, E, Eh, W, inner = unet.config.cross_attention_dim, VISION["projection_dim"], VISION["hidden_size"], 256, 256
    ip = {}
    for key_id, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            ip[f"{key_id}.to_k_ip.weight"] = r(attn.to_k.out_features, D)
            ip[f"{key_id}.to_v_ip.weight"] = r(attn.to_v.out_features, D)
    base = {"proj.weight": r(4 * D, E), "proj.bias": torch.zeros(4 * D), "norm.weight": torch.ones(D),
            "norm.bias": torch.zeros(D)}
    plus = {"latents": r(1, 16, W), "proj_in.weight": r(W, Eh), "proj_in.bias": torch.zeros(W),
            "proj_out.weight": r(D, W), "proj_out.bias": torch.zeros(D), "norm_out.weight": torch.ones(D),
            "norm_out.bias": torch.zeros(D)}
    for i in range(4):
        for n in ("0.norm1", "0.norm2", "1.0"):
            plus[f"layers.{i}.{n}.weight"], plus[f"layers.{i}.{n}.bias"] = torch.ones(W), torch.zeros(W)
        plus.update({f"layers.{i}.0.to_q.weight": r(inner, W), f"layers.{i}.0.to_kv.weight": r(2 * inner, W),
                     f"layers.{i}.0.to_out.weight": r(W, inner), f"layers.{i}.1.1.weight": r(4 * W, W),
                     f"layers.{i}.1.3.weight": r(W, 4 * W)})
    paths = {}
    for variant, proj in (("base", base), ("plus", plus)):
        paths[variant] = os.path.join(folder, f"{variant}.safetensors")
        encoder_format.save(paths[variant], proj, ip)
    return paths


def sd15_image_arithmetic(tokens, steps=30, rows=2, resampler=False):
    """attn2 K'/V' (and, for Plus, the Resampler on ViT-H's 257x1280 features) per row per step
    for SD 1.5: 16 layers, Σh = 12,480, D = 768; Resampler W 1280, 12 heads x 64, depth 4, FF 4x."""
    sum_h, D = 12_480, 768
    kv = 2 * (2 * tokens * D * sum_h)
    proj = 0
    if resampler:
        P, E, W, inner, T = 257, 1280, 1280, 768, 16
        block = 2 * (P + T) * W * 2 * inner + 2 * T * W * inner * 2 + 2 * 2 * T * (P + T) * inner + 2 * 2 * T * W * 4 * W
        proj = 2 * P * E * W + 4 * block + 2 * T * W * D
    else:
        proj = 2 * D * 4 * 1024  # Linear 1024 -> 4·768
    weight_bytes = 2 * D * sum_h * 2  # fp16 W'_K, W'_V read per forward
    return dict(kv=kv, proj=proj, saved=rows * (kv + proj) * (steps - 1), weight_bytes=weight_bytes,
                cache=rows * 2 * tokens * sum_h * 2)


def image_branch(args):
    """The image branch's plan cost and one UNet step, planned vs diffusers' per-step recompute."""
    import copy

    from diffusers import UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    import impasto
    from impasto.adapters.families import encoder as encoder_family
    from impasto.plan import Branch, build_plan
    from impasto.tiny import build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_random_model(os.path.join(tmp, "m"), seed=0, unet_config=MEDIUM)
        torch.manual_seed(0)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(os.path.join(path, "image_encoder"))
        ref_unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
        eng = impasto.Engine.from_pretrained(path)
        files = _ip_files(ref_unet, tmp)
        rng = torch.Generator().manual_seed(1)
        image = Image.fromarray((torch.rand(64, 64, 3, generator=rng) * 255).byte().numpy())
        x = torch.randn(2, 4, 32, 32, generator=rng)
        print(f"\nimage branch: same medium UNet, image encoder CLIPVisionModelWithProjection (width "
              f"{VISION['hidden_size']}, {VISION['num_hidden_layers']} layers, {VISION['image_size']} px), batch 2 (one "
              f"CFG request), float32, {torch.get_num_threads()} threads, median of {args.repeats}, the two steps "
              f"timed alternately")
        print("\n| variant | image plan per request (encoder + projection + 16 K'/V', 2 branches) | UNet step, "
              "image K'/V' recomputed (diffusers) | UNet step, from the plan | saved per step |\n|---|---|---|---|---|")
        for variant, tokens in (("base", 4), ("plus", 16)):
            name = f"ip-{variant}"
            eng.adapters.register(name, files[variant])
            images = impasto.api.ReferenceImages([image])
            opts = lambda uncond: (("image", images),) + ((("uncond", True),) if uncond else ())  # noqa: E731
            branches = [Branch("", ((name, 1.0, opts(True)),)), Branch("a red star", ((name, 1.0, opts(False)),))]
            f = {name: eng.adapters.load(name)}
            text_only = [Branch(""), Branch("a red star")]
            plan_ms = _median_ms(lambda: build_plan(branches, eng.base, eng.attn2, eng.lora, eng.adapters, f, "cpu",
                                                    torch.float32), args.repeats)
            text_ms = _median_ms(lambda: build_plan(text_only, eng.base, eng.attn2, eng.lora, eng.adapters, {}, "cpu",
                                                    torch.float32), args.repeats)
            plan = build_plan(branches, eng.base, eng.attn2, eng.lora, eng.adapters, f, "cpu", torch.float32)
            eng.state.write_layout([(plan.embeds, plan.kv)])
            eng.state.write_images(plan.image)

            def ours():
                eng.state.planned = True
                try:
                    with torch.inference_mode():
                        return eng.unet(x, 500, encoder_hidden_states=plan.embeds).sample
                finally:
                    eng.state.planned = False

            # diffusers: the same file through load_ip_adapter's conversion, the encoder run once
            # (as the pipeline does), the projection and K'/V' inside every forward
            theirs_unet = copy.deepcopy(ref_unet)
            from impasto.adapters import files as files_layer

            sd = {"image_proj": {}, "ip_adapter": {}}
            for k, v in files_layer.read_safetensors(files[variant])[1].items():
                group, _, rest = k.partition(".")
                sd[group][rest] = v
            theirs_unet._load_ip_adapter_weights([sd])
            model, processor = encoder_family.image_encoder(eng.adapters, eng.adapters.info(name).image_encoder)
            px = processor([image], return_tensors="pt").pixel_values
            with torch.inference_mode():
                if variant == "base":
                    e = model(px).image_embeds
                    embeds = torch.cat([torch.zeros_like(e), e])[:, None]
                else:
                    h = model(torch.cat([torch.zeros_like(px), px]), output_hidden_states=True).hidden_states[-2]
                    embeds = h[:, None]

            def theirs():
                with torch.inference_mode():
                    return theirs_unet(x, 500, encoder_hidden_states=plan.embeds,
                                       added_cond_kwargs={"image_embeds": [embeds]}).sample

            torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-4)
            planned, recompute = _paired_median_ms(ours, theirs, args.repeats)
            print(f"| {variant} ({tokens} tokens) | {plan_ms - text_ms:.1f} ms (total plan {plan_ms:.1f} ms) | "
                  f"{recompute:.1f} ms | {planned:.1f} ms | {recompute - planned:.1f} ms "
                  f"({(recompute - planned) / recompute:.1%}) |")
            eng.adapters.unregister(name)
        eng.close()
    print("\nSD 1.5, 512 px, 30 steps, one CFG request (2 rows), fp16, image branch:")
    print("| variant | K'/V' FLOPs per row-step | projection FLOPs per row-step (diffusers: every step) | "
          "FLOPs saved per request (29 steps) | W'_K/W'_V bytes read per step | cached K'/V' per request |")
    print("|---|---|---|---|---|---|")
    for variant, tokens, res in (("base", 4, False), ("plus", 16, True)):
        a = sd15_image_arithmetic(tokens, resampler=res)
        print(f"| {variant} | {a['kv'] / 1e6:.0f} MFLOP | {a['proj'] / 1e9:.3f} GFLOP | {a['saved'] / 1e9:.1f} GFLOP | "
              f"{a['weight_bytes'] / 1e6:.1f} MB | {a['cache'] / 1e6:.2f} MB |")


if __name__ == "__main__":
    main()
