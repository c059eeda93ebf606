"""Style guidance per denoising step: impasto's single UNet forward versus one call per branch.

Pair Customization's guidance (arXiv 2405.01536 eq. 10/11) needs, per step, the uncond, cond
and one styled prediction per style. Its pipeline (PairCustomization
`modules/StableDiffusionXLPipelineLoraGuidance.py`), like diffusers' CFG pipeline and guiders,
batches uncond+cond in one UNet call and then makes one more call per style:

  official: unet([uncond; cond] x B rows), then k x unet(B rows), then the blend in PyTorch
  impasto:  unet(B x (k + 2) rows, laid out per request), then one `guidance_blend`

Both do the same FLOPs; the difference is batching (k + 1 calls versus 1) and the blend.
What is excluded: the style LoRA (the official path switches adapters between calls, impasto
applies each row's adapter inside the one forward: see bench_lora_kernel.py and
bench_multi_lora.py), the text encoder, the scheduler and the VAE. The UNet is randomly
initialized (timings do not depend on the weights). The blend runs on the "reference" backend,
impasto's CPU path (Triton runs on CPU only under its interpreter, which is not timed).

    .venv/bin/python benchmarks/bench_guidance.py --check              # tiny + wide, a few minutes
    .venv/bin/python benchmarks/bench_guidance.py --config tiny --batch 1
"""

import argparse
import dataclasses
import statistics
import time

import torch

from impasto.kernels import RequestBranches, build_branch_table, guidance_blend
from impasto.tiny import UNET_CONFIG

CONFIGS = {
    # engine/tiny's UNet (the shipped miniature SD layout): 16x16 latents.
    "tiny": dict(UNET_CONFIG),
    # Wider and larger latents: SD 1.5's block pattern at a quarter of its width, 32x32 latents.
    "wide": {
        **UNET_CONFIG,
        "sample_size": 32,
        "block_out_channels": (64, 128),
        "cross_attention_dim": 64,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
}
TEXT_TOKENS = 77
CFG, STYLE_WEIGHT = 7.5, 4.5


@dataclasses.dataclass(frozen=True)
class Setup:
    config: str
    batch: int  # requests (one image each)
    styles: int  # k
    rescale: float


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU time, wall time) of fn() in ms over `repeats` calls after one warm-up.

    CPU time is this process's (time.process_time): with one intra-op thread it is the work
    done, and it does not count time the shared machine gave to other jobs, so it is the
    column to compare; wall time is printed beside it for the record.
    """
    fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append((time.process_time() - c0) * 1e3)
        wall.append((time.perf_counter() - w0) * 1e3)
    return statistics.median(cpu), statistics.median(wall)


def _inputs(unet, s: Setup, gen):
    cfg = unet.config
    B, k = s.batch, s.styles
    latents = torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    text = lambda: torch.randn(B, TEXT_TOKENS, cfg.cross_attention_dim, generator=gen)  # noqa: E731
    uncond, cond, styled = text(), text(), [text() for _ in range(k)]  # c ⊕ " " ⊕ suffix_i per style
    return latents, uncond, cond, styled


def official_step(unet, t, latents, uncond, cond, styled, rescale):
    """One call for [uncond; cond] (the CFG pipeline's batching), then one call per style."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    e_u, e_c = unet(torch.cat([latents, latents]), t, torch.cat([uncond, cond])).sample.chunk(2)
    e = e_u + CFG * (e_c - e_u)
    for enc in styled:
        e = e + STYLE_WEIGHT * (unet(latents, t, enc).sample - e_c)
    if rescale > 0:
        e = rescale_noise_cfg(e, e_c, guidance_rescale=rescale)
    return e


def impasto_step(unet, t, x, enc, table):
    """One call over every branch row of every request, then the fused blend."""
    return guidance_blend(unet(x, t, enc).sample, table, backend="reference")


def impasto_rows(latents, uncond, cond, styled):
    """Rows per request: [uncond, cond, style_1, ..., style_k] (N = 1 image per request)."""
    B = latents.shape[0]
    branches = [uncond, cond, *styled]
    enc = torch.stack(branches, dim=1).flatten(0, 1)  # [B * (k + 2), tokens, D]
    x = latents.repeat_interleave(len(branches), dim=0)  # [B * (k + 2), C, h, w]
    requests = [
        RequestBranches(start=b * len(branches), images=1, cfg=CFG, has_uncond=True,
                        style_weights=(STYLE_WEIGHT,) * len(styled), rescale=0.0)
        for b in range(B)
    ]
    return x, enc, requests


def run(s: Setup, unet, repeats: int, check: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    latents, uncond, cond, styled = _inputs(unet, s, gen)
    x, enc, requests = impasto_rows(latents, uncond, cond, styled)
    table = build_branch_table([dataclasses.replace(r, rescale=s.rescale) for r in requests])  # once per group
    t = torch.tensor(500)
    if check:
        a = impasto_step(unet, t, x, enc, table)
        b = official_step(unet, t, latents, uncond, cond, styled, s.rescale)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    noise = unet(x, t, enc).sample
    return dict(
        impasto=_timed(lambda: impasto_step(unet, t, x, enc, table), repeats),
        official=_timed(lambda: official_step(unet, t, latents, uncond, cond, styled, s.rescale), repeats),
        blend=_timed(lambda: guidance_blend(noise, table, backend="reference"), repeats),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="requests per step")
    p.add_argument("--styles", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--rescale", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check", action="store_true", help="assert both paths agree first")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU time = work)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), float32, no_grad, "
          f"cfg {CFG}, style weight {STYLE_WEIGHT}, rescale {args.rescale}, median of {args.repeats} after 1 warm-up")
    names = list(CONFIGS) if args.config == "all" else [args.config]
    for name in names:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**CONFIGS[name]).eval()
        params = sum(p.numel() for p in unet.parameters()) / 1e6
        print(f"\nconfig {name}: {CONFIGS[name]}  ({params:.2f} M params)")
        print("| config | B | k | rows | calls impasto / official | impasto CPU ms/step | official CPU ms/step "
              "| speedup (CPU) | impasto wall ms | official wall ms | speedup (wall) | blend CPU ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        with torch.no_grad():
            for B in args.batch:
                for k in args.styles:
                    s = Setup(name, B, k, args.rescale)
                    r = run(s, unet, args.repeats, args.check)
                    (ic, iw), (oc, ow) = r["impasto"], r["official"]
                    print(f"| {name} | {B} | {k} | {B * (k + 2)} | 1 / {k + 1} | {ic:.1f} | {oc:.1f} | {oc / ic:.2f}x "
                          f"| {iw:.1f} | {ow:.1f} | {ow / iw:.2f}x | {r['blend'][0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
