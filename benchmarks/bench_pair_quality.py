"""Pair Customization quality on the miniature world, against the single-image LoRA baseline.

For each held-out style: its VAE round-trip ceiling (impasto.eval.vae_ceiling); a style LoRA
trained by Pair Customization on one (flat, styled) pair and a single-image LoRA on the styled
image alone (same rank, steps, lr, seed); then, over a sweep of style-guidance weights, images
of held-out content prompts (another shape AND colour than the pair's, eval.pair_prompts)
scored by the probes:
    style strength          style_strength accuracy of the style
    structure preservation  prompt_fidelity over shape, colour and background
    content leakage         content_leakage of the pair's (shape, colour)
Writes a JSON of every number and a PNG of style strength against structure preservation.

    python benchmarks/bench_pair_quality.py --styles wavy --steps 100 --threads 1 \\
        --json benchmarks/pair_quality.json --png docs/pair_quality.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def run(args) -> dict:
    import impasto
    from impasto import eval as ev
    from impasto.train import pair

    eng = impasto.Engine.from_pretrained(args.model)
    prompts = ev.pair_prompts(args.n)
    out = {"config": vars(args), "styles": {}}
    tmp = tempfile.mkdtemp(prefix="pairq-")
    for style in args.styles:
        ceiling = ev.vae_ceiling(eng.base.vae, style)
        plain, styled, content_prompt, content = ev.style_pair(style)
        rec = {"ceiling": ceiling, "methods": {}}
        for method, updates in (("pair", True), ("single", False)):
            path = os.path.join(tmp, f"{style}-{method}.safetensors")
            t0 = time.perf_counter()
            pair(eng, plain, styled, content_prompt=content_prompt, suffix=args.suffix, content_rank=args.rank,
                 style_rank=args.rank, steps=args.steps, style_start=args.style_start, lr=args.lr, seed=args.seed,
                 output=path, progress=False, content_updates=updates)
            seconds = time.perf_counter() - t0
            name = f"{style}-{method}"
            eng.adapters.register(name, path, family="style")
            rows = []
            for w in args.weights:
                reqs = [impasto.Request(p, guidance=impasto.Guidance(cfg=args.cfg, styles={name: w} if w else {}),
                                        steps=args.sample_steps, seed=s) for p, s in prompts]
                images = [im for o in eng.generate_batch(reqs) for im in o.images]
                texts = [p for p, _ in prompts]
                rows.append({
                    "weight": w,
                    "style": ev.style_strength(images, style)["accuracy"],
                    "structure": ev.prompt_fidelity(images, texts, attributes=("shape", "colour", "background"))["overall"],
                    "leakage": ev.content_leakage(images, texts, content)["leakage"],
                })
                print(style, method, rows[-1], flush=True)
            rec["methods"][method] = {"train_seconds": seconds, "sweep": rows}
            eng.adapters.unregister(name)
        out["styles"][style] = rec
    return out


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = list(result["styles"])
    fig, axes = plt.subplots(1, len(styles), figsize=(4.2 * len(styles), 3.6), squeeze=False)
    for ax, style in zip(axes[0], styles):
        rec = result["styles"][style]
        for method, marker in (("pair", "o-"), ("single", "s--")):
            sweep = rec["methods"][method]["sweep"]
            ax.plot([r["structure"] for r in sweep], [r["style"] for r in sweep], marker,
                    label={"pair": "Pair Customization", "single": "single-image LoRA"}[method])
            for r in sweep:
                ax.annotate(f"{r['weight']:g}", (r["structure"], r["style"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axhline(rec["ceiling"], color="gray", lw=0.8, ls=":", label="VAE ceiling")
        ax.set_title(f"{style} (labels: style-guidance weight)", fontsize=9)
        ax.set_xlabel("structure preservation (shape, colour, background)")
        ax.set_ylabel("style strength (probe accuracy)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--styles", nargs="+", default=["wavy"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--style-start", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--suffix", default="in sks style")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--n", type=int, default=32, help="held-out prompts per weight")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.png:
        plot(result, args.png)


if __name__ == "__main__":
    main()
