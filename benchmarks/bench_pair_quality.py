"""Pair Customization quality on the miniature world, against the single-image LoRA baseline.

For each held-out style: its VAE round-trip ceiling (impasto.eval.vae_ceiling); a style LoRA
trained by Pair Customization on one (flat, styled) pair and a single-image LoRA on the styled
image alone (same rank, steps, lr, seed); then, over a sweep of style-guidance weights, images
of held-out content prompts (another shape AND colour than the pair's, eval.pair_prompts)
scored by the probes:
    style strength          style_strength accuracy of the style
    structure preservation  prompt_fidelity over shape, colour and background
    content leakage         content_leakage of the pair's (shape, colour): "leakage" (shape AND
                            colour), "any_leakage" (its shape or its colour where the prompt names
                            another), "colour_leakage" (its colour alone)
    own-pair style          style strength on the pair's own content prompt (16 seeds)
Writes a JSON of every number and a PNG of style strength against structure preservation.

--split validation scores other held-out prompts and seeds (eval.pair_prompts seed 301, and
own-pair seeds 100..115) for choosing recipes and weights; the test split (seed 300, own-pair
seeds 0..15) is what results are reported on. --style-timesteps, --shift, --flip and
--style-start are the training options compared in docs/training.md (Pair Customization).
--many N adds N random scenes of seen shapes in the style to the training set (none a held-out
prompt's contents): the upper bound of docs/training.md, Pair Customization part 6; --plain also
serves each file as a plain LoRA; each style's `on_prompts` records what a perfect method scores
on the split's prompts (their own renders in the style, after the VAE). --crop,
--permute-channels, --style-rank and --weight-decay are the one-pair options of part 7.
--compare LABEL=JSON[#RUN] ... --png draws several runs' trade-off curves in one plot.
--diagnose JSON writes the transfer diagnosis instead (docs/training.md, Pair Customization part 4):

    python benchmarks/bench_pair_quality.py --diagnose benchmarks/pair_diagnosis.json --styles banded \
        --steps 300 --style-start 100 --lr 5e-3 --n 32 --sample-steps 10

    python benchmarks/bench_pair_quality.py --styles banded wavy --steps 300 --style-start 100 --lr 5e-3 \\
        --weights 0 1 2 3 4 6 --n 32 --sample-steps 10 --json benchmarks/pair_quality.json \\
        --png docs/pair_quality.png --sheet docs/pair_sheet.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


TRAINING_ARGS = ("model", "steps", "style_start", "lr", "rank", "suffix", "seed", "style_timesteps", "shift", "flip",
                 "extra_pairs", "many", "crop", "weight_decay", "style_rank",
                 "permute_channels")


def run(args) -> dict:
    import impasto
    from impasto import eval as ev
    from impasto.train import pair

    eng = impasto.Engine.from_pretrained(args.model)
    extra = [tuple(x.split(":")) for x in args.extra_pairs]  # shape:colour[:size]
    prompts = held_out_prompts(args.n, [("heart", "green"), *(e[:2] for e in extra)],
                               seed=300 if args.split == "test" else 301)
    own_seeds = range(16) if args.split == "test" else range(100, 116)
    out = {"config": vars(args), "styles": {}}
    sheet = {}  # (style, method, weight) -> the first 8 images, for --sheet
    tmp = tempfile.mkdtemp(prefix="pairq-")
    for style in args.styles:
        ceiling = ev.vae_ceiling(eng.base.vae, style)
        plain, styled, content_prompt, content = ev.style_pair(style)
        rec = {"ceiling": ceiling, "on_prompts": prompts_ceiling(eng, style, prompts), "methods": {}}
        if extra or args.many:  # several pairs of one style: the pair's and one per extra (shape, colour)
            more = [extra_pair(style, *spec, seed=i + 1) for i, spec in enumerate(extra)]
            more += many_scenes(style, args.many)
            train_plain, train_styled = [plain] + [m[0] for m in more], [styled] + [m[1] for m in more]
            train_prompts = [content_prompt] + [m[2] for m in more]
        else:
            train_plain, train_styled, train_prompts = plain, styled, content_prompt
        for method, updates in (("pair", True), ("single", False)):
            if method not in args.methods:
                continue
            path = os.path.join(args.adapters or tmp, f"{style}-{method}.safetensors")
            recipe = {k: getattr(args, k) for k in TRAINING_ARGS}
            if args.adapters and os.path.isfile(path):  # reuse a file this bench trained with the same recipe
                with open(path + ".json") as f:
                    kept = json.load(f)
                defaults = {"many": 0, "crop": 1.0, "weight_decay": 1e-4, "style_rank": 0, "permute_channels": False}  # files from before these flags
                if {**defaults, **kept["recipe"]} != recipe:
                    raise SystemExit(f"{path} was trained with {kept['recipe']}, not {recipe}")
                seconds = kept["train_seconds"]
            else:
                t0 = time.perf_counter()
                pair(eng, train_plain, train_styled, content_prompt=train_prompts, suffix=args.suffix,
                     content_rank=args.rank, style_rank=args.style_rank or args.rank, steps=args.steps,
                     style_start=args.style_start, lr=args.lr, seed=args.seed, output=path, progress=False,
                     content_updates=updates, shift=args.shift, flip=args.flip, crop=args.crop,
                     weight_decay=args.weight_decay, permute_channels=args.permute_channels,
                     style_timesteps=tuple(args.style_timesteps) if args.style_timesteps else None)
                seconds = time.perf_counter() - t0
                if args.adapters:
                    with open(path + ".json", "w") as f:
                        json.dump({"recipe": recipe, "train_seconds": seconds}, f)
            name = f"{style}-{method}"
            if args.style_blocks:
                path = keep_blocks(path, args.style_blocks, os.path.join(tmp, f"{style}-{method}-blocks.safetensors"))
            eng.adapters.register(name, path, family="style")
            rows = []
            for w in args.weights:
                # --start: style guidance over the later part of the schedule only (a scheduled style)
                window = args.start or args.end < 1
                styles = {name: impasto.Adapter(name, w, start=args.start, end=args.end) if window else w} if w else {}
                reqs = [impasto.Request(p, guidance=impasto.Guidance(cfg=args.cfg, styles=styles),
                                        steps=args.sample_steps, seed=s) for p, s in prompts]
                images = [im for o in eng.generate_batch(reqs) for im in o.images]
                texts = [p for p, _ in prompts]
                sheet[(style, method, w)] = [np.asarray(im) for im in images[:8]]
                leak = ev.content_leakage(images, texts, content)
                rows.append({
                    "weight": w,
                    "style": ev.style_strength(images, style)["accuracy"],
                    "structure": ev.prompt_fidelity(images, texts, attributes=("shape", "colour", "background"))["overall"],
                    "leakage": leak["leakage"],
                    "any_leakage": leak["any_leakage"],
                    "colour_leakage": leak["colour_leakage"],
                })
                own = [impasto.Request(content_prompt, guidance=reqs[0].guidance, steps=args.sample_steps, seed=s)
                       for s in own_seeds]  # the training pair's own content prompt: does the LoRA fit its pair?
                own_images = [im for o in eng.generate_batch(own) for im in o.images]
                rows[-1]["own_pair_style"] = ev.style_strength(own_images, style)["accuracy"]
                print(style, method, rows[-1], flush=True)
            plain_rows = []
            for scale in args.plain:  # the style LoRA as a plain LoRA, the suffix in the prompt, no style guidance
                eng.adapters.register(name + "-lora", path, family="lora")
                reqs = [impasto.Request(p + " " + args.suffix, adapters=[(name + "-lora", scale)],
                                        guidance=impasto.Guidance(cfg=args.cfg), steps=args.sample_steps, seed=s)
                        for p, s in prompts]
                images = [im for o in eng.generate_batch(reqs) for im in o.images]
                texts = [p for p, _ in prompts]
                leak = ev.content_leakage(images, texts, content)
                plain_rows.append({"scale": scale, "style": ev.style_strength(images, style)["accuracy"],
                                   "structure": ev.prompt_fidelity(images, texts, attributes=("shape", "colour",
                                                                                              "background"))["overall"],
                                   "leakage": leak["leakage"], "any_leakage": leak["any_leakage"],
                                   "colour_leakage": leak["colour_leakage"]})
                print(style, method, "plain LoRA", plain_rows[-1], flush=True)
                eng.adapters.unregister(name + "-lora")
            rec["methods"][method] = {"train_seconds": seconds, "sweep": rows}
            if plain_rows:
                rec["methods"][method]["plain_lora"] = plain_rows
            eng.adapters.unregister(name)
        out["styles"][style] = rec
        sheet[(style, "pair", "train")] = [np.asarray(plain), np.asarray(styled)]
    if args.sheet:
        write_sheet(sheet, args.sheet)
    return out


def prompts_ceiling(eng, style: str, prompts) -> dict:
    """What a perfect method would score on these prompts: the world's own renders of each prompt
    (its shape, colour and background; size and position drawn from its seed), in `style`, and
    flat, read clean and after a VAE round trip: style strength and structure preservation (the
    same prompt_fidelity the sweep reports). The styled-after-VAE pair is the joint ceiling."""
    from impasto import eval as ev
    from impasto.tiny import world

    texts, out = [p for p, _ in prompts], {}
    for look in (style, "flat"):
        ims = []
        for p, s in prompts:
            named = world.parse_prompt(p)
            scene = world.sample_scene(np.random.default_rng([s]), shape=named["shape"], colour=named["colour"],
                                       background=named["background"], count=1, style=look)
            ims.append(world.render_pair(scene, s)[1])
        ims = np.stack(ims)
        for where, x in (("clean", ims), ("vae", ev.vae_round_trip(eng.base.vae, ims))):
            out[f"{look}_{where}"] = {
                "style": ev.style_strength(x, style)["accuracy"],
                "structure": ev.prompt_fidelity(x, texts, attributes=("shape", "colour", "background"))["overall"]}
    return out


def keep_blocks(path: str, prefixes, out: str) -> str:
    """A copy of a style LoRA file with B zeroed in every module outside `prefixes` (UNet module
    name prefixes, e.g. "up_blocks"): the style applied by those blocks alone."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    state = load_file(path)
    inside = lambda k: any(k.startswith("unet." + p) for p in prefixes)  # noqa: E731
    if not any(inside(k) for k in state):
        raise SystemExit(f"--style-blocks {prefixes}: no module of {path} starts with these")
    save_file({k: v if "lora_A" in k or inside(k) else v.new_zeros(v.shape) for k, v in state.items()}, out, metadata=meta)
    return out


def held_out_prompts(n: int, contents, seed: int) -> list:
    """eval.pair_prompts (another shape AND colour than the pair's) when `contents` is the one
    pair; with several pairs, the prompts whose shape or colour is none of theirs."""
    from impasto import eval as ev
    from impasto.tiny import world

    if len(set(contents)) == 1:
        return ev.pair_prompts(n, contents[0], seed=seed)
    shapes, colours = {s for s, _ in contents}, {c for _, c in contents}
    out, k = [], n
    while len(out) < n:
        out = [(p, s) for p, s in ev.pair_prompts(k, contents[0], seed=seed)
               if world.parse_prompt(p)["shape"] not in shapes and world.parse_prompt(p)["colour"] not in colours][:n]
        k *= 2
    return out


def many_scenes(style: str, n: int, seed: int = 77) -> list:
    """n random world scenes of seen shapes (any colour, size, position, background, one or two
    objects), flat and in `style`, with their full captions: the upper-bound training set. No
    scene names the (shape, colour, background) of a held-out prompt of either split, and none is
    the pair's green heart, so the scored prompts' contents are never trained on."""
    from impasto import eval as ev
    from impasto.tiny import world

    held = {tuple(world.parse_prompt(p)[k] for k in ("shape", "colour", "background"))
            for split_seed in (300, 301) for p, _ in ev.pair_prompts(64, seed=split_seed)}
    out, i = [], 0
    while len(out) < n:
        rng = np.random.default_rng([seed, i])
        scene = world.sample_scene(rng, style=style)
        i += 1
        if (scene.shape, scene.colour, scene.background) in held or (scene.shape, scene.colour) == ("heart", "green"):
            continue
        plain, styled = world.render_pair(scene, 10_000 + i)
        from PIL import Image

        out.append((Image.fromarray(plain), Image.fromarray(styled), world.caption(replace_style(scene, "flat"))))
    return out


def replace_style(scene, style):
    from dataclasses import replace

    return replace(scene, style=style)


def extra_pair(style: str, shape: str, colour: str, size: str = "large", *, seed: int):
    """Another training pair of one style: a `size` `colour` `shape` on the pair's background."""
    import numpy as np
    from PIL import Image

    from impasto.tiny import world

    bg = "blue to white gradient"
    scene = world.sample_scene(np.random.default_rng([seed, 0]), shape=shape, colour=colour, background=bg, count=1,
                               size=size, style=style)
    plain, styled = world.render_pair(scene, seed)
    return Image.fromarray(plain), Image.fromarray(styled), f"a {size} {colour} {shape} on a {bg} background"



def diagnose(args) -> dict:
    """Why the style does not transfer (docs/training.md, Pair Customization part 4), on the
    sweep's recipe and the chosen split's held-out prompts, first style of --styles: the style's
    ceiling on these prompts (by size too), the content LoRA's own fit, what the style LoRA draws
    served as a plain LoRA, which held-out objects take the style, where the style branch changes
    pixels, and the style kept in one part of the UNet or over one window of the steps."""
    import impasto
    from impasto import eval as ev
    from impasto.tiny import world
    from impasto.tiny.probes import CLASSES
    from impasto.train import pair

    style = args.styles[0]
    eng = impasto.Engine.from_pretrained(args.model)
    where = args.adapters or tempfile.mkdtemp(prefix="pairdiag-")
    os.makedirs(where, exist_ok=True)
    plain, styled, cprompt, content = ev.style_pair(style)
    prompts = ev.pair_prompts(args.n, seed=300 if args.split == "test" else 301)
    texts = [p for p, _ in prompts]
    own = [(cprompt, s) for s in (range(16) if args.split == "test" else range(100, 116))]
    files = {}
    for method, updates in (("pair", True), ("single", False)):
        path = os.path.join(where, f"{style}-{method}.safetensors")
        cpath = os.path.join(where, f"{style}-pair-content.safetensors") if updates else None
        if not os.path.isfile(path) or (cpath and not os.path.isfile(cpath)):
            pair(eng, plain, styled, content_prompt=cprompt, suffix=args.suffix, content_rank=args.rank,
                 style_rank=args.rank, steps=args.steps, style_start=args.style_start, lr=args.lr, seed=args.seed,
                 output=path, content_output=cpath, progress=False, content_updates=updates)
        files[method] = path
    gen = lambda reqs: [im for o in eng.generate_batch(reqs) for im in o.images]  # noqa: E731

    def score(images, tx):
        probs = ev._read(images, None)
        read = lambda k, v: float(np.mean([CLASSES[k][int(i)] == v for i in probs[k].argmax(1)]))  # noqa: E731
        return {"style": ev.style_strength(images, style)["accuracy"],
                "structure": ev.prompt_fidelity(images, tx, attributes=("shape", "colour", "background"))["overall"],
                "any_leakage": ev.content_leakage(images, tx, content)["any_leakage"],
                "reads_pair_shape": read("shape", content[0]), "reads_pair_colour": read("colour", content[1])}

    def guided(name, w, start=0.0, end=1.0, ps=prompts):
        styles = {name: impasto.Adapter(name, w, start=start, end=end) if (start or end < 1) else w} if w else {}
        return [impasto.Request(p, guidance=impasto.Guidance(cfg=args.cfg, styles=styles), steps=args.sample_steps,
                                seed=s) for p, s in ps]

    out = {"style": style, "split": args.split}
    # the ceiling on these prompts: the world's own renders of them in the style, clean and after the VAE
    renders, sizes = [], {}
    for p, s in prompts:
        named = world.parse_prompt(p)
        scene = world.sample_scene(np.random.default_rng([s]), shape=named["shape"], colour=named["colour"],
                                   background=named["background"], count=1, style=style)
        renders.append(world.render_pair(scene, s)[1])
    out["ceiling_on_prompts"] = {"clean": ev.style_strength(np.stack(renders), style)["accuracy"],
                                 "vae": ev.style_strength(ev.vae_round_trip(eng.base.vae, np.stack(renders)), style)["accuracy"]}
    for size in world.SIZE_NAMES:
        ims = [world.render_pair(world.sample_scene(np.random.default_rng([9, i]), count=1, size=size, style=style), i)[1]
               for i in range(64)]
        sizes[size] = ev.style_strength(ev.vae_round_trip(eng.base.vae, np.stack(ims)), style)["accuracy"]
    out["vae_ceiling_by_size"] = sizes
    # the content LoRA on its own prompt and on the held-out prompts
    eng.adapters.register("diag-content", os.path.join(where, f"{style}-pair-content.safetensors"), family="lora")
    target = np.asarray(plain).astype(np.float32)
    rms = lambda ims: float(np.sqrt(np.mean([(np.asarray(i).astype(np.float32) - target) ** 2 for i in ims])))  # noqa: E731
    with_c = gen([impasto.Request(cprompt, adapters=[("diag-content", 1.0)], steps=args.sample_steps, seed=s) for _, s in own])
    base = gen([impasto.Request(cprompt, steps=args.sample_steps, seed=s) for _, s in own])
    out["content_lora"] = {"own": {**score(with_c, cprompt), "rms_to_content_image": rms(with_c)},
                           "base_own": {**score(base, cprompt), "rms_to_content_image": rms(base)},
                           "held_out": score(gen([impasto.Request(p, adapters=[("diag-content", 1.0)], steps=args.sample_steps,
                                                                  seed=s) for p, s in prompts]), texts)}
    # the style LoRA served as a plain LoRA at scale 1, the suffix in the prompt
    for method in files:
        eng.adapters.register(f"diag-{method}-lora", files[method], family="lora")
        eng.adapters.register(f"diag-{method}", files[method], family="style")
        req = lambda p, s: impasto.Request(p + " " + args.suffix, adapters=[(f"diag-{method}-lora", 1.0)],  # noqa: E731
                                           steps=args.sample_steps, seed=s)
        out[f"{method}_as_lora"] = {"held_out": score(gen([req(p, s) for p, s in prompts]), texts),
                                    "own": score(gen([req(p, s) for p, s in own]), cprompt)}
    # which objects take the style, and where the pixels change (w = 4 and 6 against w = 0)
    from dataclasses import replace

    scene = world.sample_scene(np.random.default_rng([0, 0]), shape=content[0], colour=content[1],
                               background="blue to white gradient", count=1, size="large", style=style)
    heart = world.render_with_mask(replace(scene, style="flat"), np.random.default_rng(0))[1] > 0.5
    w0 = np.stack([np.asarray(i) for i in gen(guided("diag-pair", 0))]).astype(np.float32)
    obj = np.abs(w0 - np.median(w0, axis=2, keepdims=True)).mean(-1) > 30  # the w = 0 object, roughly
    read0 = ev._read(w0.astype(np.uint8), None)
    size0 = [CLASSES["size"][int(i)] for i in read0["size"].argmax(1)]
    for method in files:
        for w in (4.0, 6.0):
            ims = gen(guided(f"diag-{method}", w))
            d = np.abs(np.stack([np.asarray(i) for i in ims]).astype(np.float32) - w0).mean(-1)
            region = lambda m: float(np.mean([d[i][m[i]].mean() for i in range(len(d)) if m[i].sum() > 3]))  # noqa: E731
            hit = ev._read(ims, None)["style"].argmax(1) == CLASSES["style"].index(style)
            by = {"size_at_w0": {z: [float(np.mean([hit[i] for i in range(len(hit)) if size0[i] == z])), size0.count(z)]
                                 for z in sorted(set(size0))},
                  "colour": {c: float(np.mean([hit[i] for i, t in enumerate(texts) if world.parse_prompt(t)["colour"] == c]))
                             for c in sorted({world.parse_prompt(t)["colour"] for t in texts})}}
            out[f"{method}_w{w:g}"] = {**score(ims, texts), "by": by, "mean_abs_change": {
                "object_in_pair_outline": region(obj & heart[None]), "object_outside": region(obj & ~heart[None]),
                "pair_outline_no_object": region(~obj & heart[None]), "elsewhere": region(~obj & ~heart[None])}}
    # the style LoRA kept in one part of the UNet (B zeroed elsewhere), and over one window of the steps
    groups = {"down_blocks": ["down_blocks"], "mid_block": ["mid_block"], "up_blocks": ["up_blocks"],
              "up_blocks.1": ["up_blocks.1"], "up_blocks.2": ["up_blocks.2"], "attn1": None, "attn2": None}
    tmp = tempfile.mkdtemp(prefix="pairdiag-blocks-")
    for g, prefixes in groups.items():
        if prefixes is None:  # one attention kind everywhere
            from safetensors import safe_open
            from safetensors.torch import load_file, save_file

            with safe_open(files["pair"], "pt") as f:
                meta = f.metadata()
            state = load_file(files["pair"])
            path = os.path.join(tmp, f"{g}.safetensors")
            save_file({k: v if "lora_A" in k or f".{g}." in k else v.new_zeros(v.shape) for k, v in state.items()},
                      path, metadata=meta)
        else:
            path = keep_blocks(files["pair"], prefixes, os.path.join(tmp, f"{g}.safetensors"))
        eng.adapters.register(f"diag-{g}", path, family="style")
        out[f"blocks_{g}"] = {f"{w:g}": score(gen(guided(f"diag-{g}", w)), texts) for w in (4.0, 6.0, 8.0)}
    for a, b in ((0.0, 0.3), (0.3, 0.6), (0.6, 1.0), (0.0, 0.6), (0.3, 1.0)):
        out[f"steps_{a:g}-{b:g}"] = {f"{w:g}": score(gen(guided("diag-pair", w, a, b)), texts) for w in (4.0, 6.0, 8.0)}
    eng.close()
    return out


def write_sheet(sheet: dict, path: str) -> None:
    """One row per (style, method, weight): the first 8 held-out images, 3x upscaled; the
    training pair first in each style's block."""
    from PIL import Image, ImageDraw

    rows = list(sheet.items())
    cell, label = 96, 150
    im = Image.new("RGB", (label + 8 * cell, len(rows) * cell), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for r, ((style, method, w), ims) in enumerate(rows):
        d.text((4, r * cell + 40), f"{style} {method} {w}", fill=(0, 0, 0))
        for c, x in enumerate(ims):
            im.paste(Image.fromarray(x).resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    im.save(path)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = list(result["styles"])
    fig, axes = plt.subplots(1, len(styles), figsize=(4.2 * len(styles), 3.6), squeeze=False)
    for ax, style in zip(axes[0], styles):
        rec = result["styles"][style]
        for method, marker in (("pair", "o-"), ("single", "s--")):
            if method not in rec["methods"]:
                continue
            sweep = rec["methods"][method]["sweep"]
            ax.plot([r["structure"] for r in sweep], [r["style"] for r in sweep], marker,
                    label={"pair": "Pair Customization", "single": "single-image LoRA"}[method])
            for r in sweep:
                ax.annotate(f"{r['weight']:g}", (r["structure"], r["style"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        ax.axhline(rec["ceiling"], color="gray", lw=0.8, ls=":", label="VAE ceiling")
        # the target: style >= 0.8 x ceiling at structure >= 0.80 (the shaded corner)
        ax.fill_between([0.8, 1.0], 0.8 * rec["ceiling"], 1.0, color="green", alpha=0.08, label="target")
        ax.set_title(f"{style} (labels: style-guidance weight)", fontsize=9)
        ax.set_xlabel("structure preservation (shape, colour, background)")
        ax.set_ylabel("style strength (probe accuracy)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_compare(runs: list, path: str, title: str) -> None:
    """Style strength against structure preservation for several runs of this bench (one style
    each): `runs` = [(label, JSON path)], one curve per (run, method); a plain-LoRA row is a
    cross, the split's joint ceiling (the world's renders after the VAE) a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    ceiling = None
    for label, file in runs:
        file, _, run = file.partition("#")  # FILE#RUN: one run of a file of runs ({"runs": {RUN: result}})
        with open(file) as f:
            result = json.load(f)
        result = result["runs"][run] if run else result
        rec = next(iter(result["styles"].values()))
        ceiling = rec.get("on_prompts", {}).get(f"{next(iter(result['styles']))}_vae", ceiling)
        for method, sweep in rec["methods"].items():
            name = label if len(rec["methods"]) == 1 else f"{label}, {'Pair' if method == 'pair' else 'style LoRA alone'}"
            line, = ax.plot([r["structure"] for r in sweep["sweep"]], [r["style"] for r in sweep["sweep"]],
                            "o-" if method == "pair" else "s--", ms=4, label=name)
            for r in sweep["sweep"]:
                ax.annotate(f"{r['weight']:g}", (r["structure"], r["style"]), fontsize=6, xytext=(2, 2),
                            textcoords="offset points")
            for r in sweep.get("plain_lora", []):
                ax.plot([r["structure"]], [r["style"]], "x", color=line.get_color(), ms=7)
    if ceiling:
        ax.plot([ceiling["structure"]], [ceiling["style"]], "*", color="k", ms=12,
                label="the prompts' own styled renders after the VAE")
    ax.axvline(0.8, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("structure preservation (shape, colour, background)")
    ax.set_ylabel("style strength (probe accuracy)")
    ax.set_title(title + " (labels: style-guidance weight; x: plain LoRA at scale 1)", fontsize=8)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _write_json(path, result):
    from impasto import eval as ev

    with open(path, "w") as f:
        json.dump(ev.json_safe(result), f, indent=1, allow_nan=False)  # NaN (nothing to score) -> null


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
    p.add_argument("--start", type=float, default=0.0, help="style guidance from this fraction of the steps on")
    p.add_argument("--end", type=float, default=1.0, help="style guidance before this fraction of the steps only")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--methods", nargs="+", default=["pair", "single"], choices=("pair", "single"))
    p.add_argument("--style-timesteps", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="train the style update only at the shared t in [LO, HI)")
    p.add_argument("--shift", type=int, default=0, help="paired random horizontal shift (px) in training")
    p.add_argument("--flip", action="store_true", help="paired random horizontal flip in training")
    p.add_argument("--crop", type=float, default=1.0, help="paired random crop (smallest side fraction) in training")
    p.add_argument("--permute-channels", action="store_true", help="paired random RGB permutation in training")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay in training")
    p.add_argument("--style-rank", type=int, default=0, help="the style LoRA's rank (default: --rank)")
    p.add_argument("--style-blocks", nargs="+", default=None, metavar="PREFIX",
                   help="serve the style LoRA in these UNet blocks only (e.g. up_blocks), B zeroed elsewhere")
    p.add_argument("--adapters", default=None, help="keep the trained files here and reuse them when the recipe "
                                                    "matches (e.g. to score other weights or sampling steps)")
    p.add_argument("--extra-pairs", nargs="*", default=[], metavar="SHAPE:COLOUR[:SIZE]",
                   help="train on several pairs of one style: these besides the green heart (held-out prompts "
                        "then avoid every pair's shape and colour)")
    p.add_argument("--many", type=int, default=0, metavar="N",
                   help="the upper bound: also train on N random scenes of seen shapes in the style (none names a "
                        "held-out prompt's contents); held-out prompts stay the pair's")
    p.add_argument("--plain", type=float, nargs="*", default=[], metavar="SCALE",
                   help="also serve each style file as a plain LoRA at these scales, the suffix in the prompt")
    p.add_argument("--n", type=int, default=32, help="held-out prompts per weight")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--sheet", default=None, help="PNG of the first 8 images of every (style, method, weight)")
    p.add_argument("--replot", default=None, metavar="JSON", help="only redraw --png from a JSON this bench wrote")
    p.add_argument("--diagnose", default=None, metavar="JSON",
                   help="instead of the sweep, write the transfer diagnosis (first of --styles, the pair recipe) here")
    p.add_argument("--compare", nargs="+", default=None, metavar="LABEL=JSON[#RUN]",
                   help="only draw --png: the trade-off curves of these JSONs this bench wrote, one style each "
                        "(#RUN: one run of a file of runs, as benchmarks/pair_upper_bound.json)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    if args.compare:
        plot_compare([tuple(x.split("=", 1)) for x in args.compare], args.png, args.title)
        return
    if args.diagnose:
        torch.set_num_threads(args.threads)
        result = diagnose(args)
        _write_json(args.diagnose, result)
        return
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.png)
        return
    torch.set_num_threads(args.threads)
    result = run(args)
    if args.json:
        _write_json(args.json, result)
    if args.png:
        plot(result, args.png)


if __name__ == "__main__":
    main()
