"""Customization quality on the miniature world (docs/training.md, "Quality").

For each held-out object (impasto.eval.concept_set: 8 references with exact masks, 48 held-out
prompts, fixed seeds), train and score, side by side in one run:
    base  the base model with the class word ("a star ...")
    ti    textual inversion: only the placeholder's row (custom_diffusion(train_kv=False))
    ft    full UNet fine-tuning, DreamBooth-style (full_finetune)
    cd    Custom Diffusion (custom_diffusion)
    enc   the encoder adapter, zero-shot: no per-object training, the first reference (background
          masked) as ip_adapter_image, the class word as the phrase (eval.zero_shot_requests);
          --encoder FILE[=LABEL] (repeatable) scores several files (the shipped one by default)
Concept fidelity = eval.concept_accuracy over the 48 generations; prompt fidelity =
eval.prompt_fidelity over background, count and style. 25 DDIM steps, guidance 7.5. The
random-rescale augmentation is off unless --rescale-aug (full fine-tuning never uses it).

    python benchmarks/bench_training.py --objects sparkle moon arrow --json out.json --sheets docs/

Choosing and reporting (docs/training.md, "A real baseline, ..."): --split validation test scores
both splits, --eval-at 500,1000 scores one run at several step counts. The current recipes
(docs/training.md, "The baseline on the same captions, ..."): every method --captions --no-masks
(each reference captioned with its own size, background and style), full fine-tuning 750 steps,
Custom Diffusion --freeze crossattn at 500 steps:

    python benchmarks/bench_training.py --methods ft cd --captions --no-masks --freeze crossattn --steps ti=250,ft=750,cd=500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import impasto
from impasto import eval as ev
from impasto.tiny import SHIPPED_DIR
from impasto.train import custom_diffusion, full_finetune
from impasto.train.custom_diffusion import generate_prior

METHODS = ("base", "ti", "ft", "cd", "enc")


def generate(engine, cs, phrase, adapters, steps):
    reqs = [impasto.Request(p, adapters=adapters, seed=s, steps=steps, guidance=7.5)
            for p, s in zip(cs.prompts(phrase), cs.seeds)]
    outs = engine.generate_batch(reqs)
    for o in outs:
        if o.error is not None:
            raise o.error
    return [o.images[0] for o in outs], cs.prompts(phrase)


def run_encoder(obj, path, label, args):
    """Zero-shot: register the file, time the first image, then the 48 protocol prompts."""
    cs = ev.concept_set(obj, args.seed)
    engine = impasto.Engine.from_pretrained(args.model, device="cpu")
    t0 = time.perf_counter()
    engine.adapters.register("enc", path)
    first = ev.zero_shot_requests(cs, "enc", scale=args.encoder_scale, n=1, steps=args.sample_steps)
    engine.generate_batch(first)
    info = {"object": obj, "method": label, "train_seconds": 0.0, "steps": 0, "bytes": os.path.getsize(path),
            "first_image_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    outs = engine.generate_batch(ev.zero_shot_requests(cs, "enc", scale=args.encoder_scale, steps=args.sample_steps))
    for o in outs:
        if o.error is not None:
            raise o.error
    images, prompts = [o.images[0] for o in outs], cs.prompts(cs.class_word)
    info["generate_seconds"] = time.perf_counter() - t0
    info["concept_accuracy"] = ev.concept_accuracy(images, obj)
    pf = ev.prompt_fidelity(images, prompts, attributes=ev.CONTEXT_ATTRIBUTES)
    info["prompt_fidelity"] = pf["overall"]
    info.update({f"pf_{k}": pf[k] for k in ev.CONTEXT_ATTRIBUTES})
    info["copy_paste"] = ev.copy_paste(images, prompts, "medium", 1)["copy_paste"]  # reference 0: medium, one
    engine.close()
    return info, images, cs


def score(engine, cs, obj, phrase, adapters, args):
    """Generate the split's 48 prompts at their seeds and score them (concept, prompt fidelity)."""
    t0 = time.perf_counter()
    images, prompts = generate(engine, cs, phrase, adapters, args.sample_steps)
    info = {"generate_seconds": time.perf_counter() - t0, "concept_accuracy": ev.concept_accuracy(images, obj)}
    pf = ev.prompt_fidelity(images, prompts, attributes=ev.CONTEXT_ATTRIBUTES)
    info["prompt_fidelity"] = pf["overall"]
    info.update({f"pf_{k}": pf[k] for k in ev.CONTEXT_ATTRIBUTES})
    return info, images


def run_one(obj, method, args, work):
    """Train once and score at every --eval-at step count on every --split: a run of N steps is
    bit for bit the first N steps of a longer one (constant lr; resumed from its checkpoint at N,
    which test_resume_is_bit_identical checks), so one run gives the whole step sweep.
    Yields (info, images of the last split, concept set of the last split) per step count."""
    sets = {split: ev.concept_set(obj, args.seed, split=split) for split in args.split}
    cs = sets[args.split[0]]
    engine = impasto.Engine.from_pretrained(args.model, device="cpu")
    out = os.path.join(work, f"{obj}-{method}")
    masks = cs.masks if args.masks else None
    common = dict(class_word=cs.class_word, masks=masks, batch_size=args.batch_size, seed=args.seed, output=out,
                  progress=False)
    extra, prior_s = {}, 0.0
    if method in ("ti", "cd") and args.num_prior:
        # the class images once (what custom_diffusion itself would generate from these prompts, in
        # this order and at these seeds), passed to every resumed call
        texts = cs.prior_prompts(args.num_prior, args.seed) if args.prior_prompts == "context" else \
            [f"a {cs.class_word}"]
        t0 = time.perf_counter()
        pairs = generate_prior(engine, texts, args.num_prior, seed=args.seed * 7919)
        prior_s = time.perf_counter() - t0
        extra = dict(prior_images=[im for im, _ in pairs], class_prompts=[t for _, t in pairs])
    if method in ("ti", "cd", "ft") and args.captions:  # the baseline gets the same data and prompts
        extra["captions"] = cs.reference_captions("{placeholder} {class_word}")
    points = [0] if method == "base" else (args.eval_at or [args.steps[method]])
    every = int(np.gcd.reduce(points)) if method != "base" else 0
    train_s = 0.0
    for n in points:
        info = {"object": obj, "method": method, "train_seconds": 0.0, "steps": 0, "bytes": 0}
        adapters, phrase = [], cs.class_word
        if method in ("ti", "cd"):
            cd = method == "cd"
            kw = dict(train_kv=cd, compress=cd and args.freeze == "crossattn_kv" and n == points[-1],
                      aug=args.rescale_aug, freeze=args.freeze if cd else "crossattn_kv")
            r = custom_diffusion(engine, cs.images, steps=n, lr=args.lr[method], checkpoint_every=every, resume=True,
                                 prior_weight=args.prior_weight, **kw, **extra, **common)
        elif method == "ft":
            r = full_finetune(engine, cs.images, steps=n, lr=args.lr[method], checkpoint_every=every, resume=True,
                              captions=extra.get("captions"), **common)
        if method != "base":
            train_s += r.seconds
            at = f"{out}-at{n}"  # a copy per step count: each registration reads its own files
            shutil.copytree(out, at, ignore=shutil.ignore_patterns("checkpoint-*"))
            engine.adapters.register(f"trained{n}", at)
            adapters, phrase = [f"trained{n}"], f"<new1> {cs.class_word}"
            # bytes of what the method's result needs: ft its UNet, cd its weights + token, ti its token
            need = {"ft": ("unet", "<new1>"), "cd": ("weights", "<new1>"), "ti": ("<new1>",)}[method]
            info.update(train_seconds=train_s, prior_seconds=prior_s, steps=r.steps,
                        bytes=sum(os.path.getsize(r.files[k]) for k in need),
                        files={k: os.path.getsize(v) for k, v in r.files.items()},
                        final_loss=float(np.mean(r.losses[-20:])))
        for split, cset in sets.items():
            scored, images = score(engine, cset, obj, phrase, adapters, args)
            row = dict(info, split=split, **scored)
            yield row, images, cset
    engine.close()


def sheet(cs, rows: dict, path: str, n: int = 8) -> None:
    """References on top, then n generations per method, 2x upscaled."""
    cell = 64
    grid = Image.new("RGB", (cell * n, cell * (1 + len(rows))), "white")
    for j, im in enumerate(cs.images[:n]):
        grid.paste(im.resize((cell, cell), Image.NEAREST), (j * cell, 0))
    for i, (name, images) in enumerate(rows.items(), 1):
        for j, im in enumerate(images[:n]):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (j * cell, i * cell))
    grid.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--objects", nargs="+", default=["sparkle", "moon", "arrow"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", default="ti=250,ft=250,cd=1000",
                   help="per method, e.g. cd=250,ft=200 (cd 1000: the best three-object concept mean of 250/500/1000 "
                        "steps, 200 s; docs/training.md, 'The runs the corrected setup left open')")
    p.add_argument("--lr", default="ti=1e-3,ft=1e-4,cd=1e-4", help="per method (ti, cd: base rate x batch)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-prior", type=int, default=0, help="class images for prior preservation (ti, cd)")
    p.add_argument("--prior-weight", type=float, default=1.0, help="cd/ti: weight of the prior term (the script's 1.0)")
    p.add_argument("--prior-prompts", default="class", choices=("class", "context"),
                   help="class: every class image from 'a <class word>' (the script's); context: "
                        "ConceptSet.prior_prompts, the world's full captions on backgrounds neither split uses")
    p.add_argument("--captions", action="store_true",
                   help="ti/cd/ft: caption each reference with its own size, background and style "
                        "(ConceptSet.reference_captions) instead of 'a <new1> <class word>'")
    p.add_argument("--split", nargs="+", default=["test"], choices=("test", "validation"),
                   help="concept_set splits to score on (validation: for choosing; test: for reporting)")
    p.add_argument("--eval-at", default="", help="comma-separated step counts to score one run at (e.g. 250,500,1000)")
    p.add_argument("--freeze", default="crossattn_kv", choices=("crossattn_kv", "crossattn"),
                   help="cd: K/V only (the default) or Q, K, V and out of every attn2")
    p.add_argument("--no-masks", dest="masks", action="store_false", help="train without the exact masks")
    p.add_argument("--rescale-aug", action="store_true",
                   help="Custom Diffusion's random-rescale augmentation for ti/cd (off by default: at 32 px it "
                        "costs the sparkle a third of its concept fidelity; docs/training.md)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, 2 threads contend badly)")
    p.add_argument("--encoder", action="append", default=None,
                   help="enc: an IP-Adapter file, FILE or FILE=LABEL (repeatable; default the shipped tiny one)")
    p.add_argument("--encoder-scale", type=float, default=1.0, help="enc: the adapter's scale")
    p.add_argument("--json", default=None)
    p.add_argument("--sheets", default=None, help="folder for <object>_training.png contact sheets")
    args = p.parse_args(argv)
    args.steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    args.lr = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(","))}
    args.eval_at = sorted(int(v) for v in args.eval_at.split(",") if v)
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as work:
        for obj in args.objects:
            rows = {}
            for m in args.methods:
                runs = [(m, None)]
                if m == "enc":
                    files = args.encoder or [os.path.join(SHIPPED_DIR, "ip_adapter", "ip_adapter.safetensors")]
                    runs = [(f.partition("=")[2] or "enc", f.partition("=")[0]) for f in files]
                for label, path in runs:
                    got = [run_encoder(obj, path, label, args)] if path else run_one(obj, m, args, work)
                    for info, images, cs in got:
                        if info.get("split", "test") == args.split[-1]:  # one sheet row per step count
                            rows[label if len(args.eval_at) < 2 or m == "base" else f"{label}@{info['steps']}"] = images
                        results.append(info)
                        print(json.dumps({k: v for k, v in info.items() if k != "files"}), flush=True)
            if args.sheets:
                sheet(cs, rows, os.path.join(args.sheets, f"{obj}_training.png"))
    print(f"{'object':8} {'method':6} {'split':10} {'steps':>5} {'concept':>8} {'prompt':>7} {'train s':>8} {'s/step':>7} {'bytes':>11}")
    for r in results:
        sps = r["train_seconds"] / r["steps"] if r["steps"] else 0.0
        print(f"{r['object']:8} {r['method']:6} {r.get('split', 'test'):10} {r['steps']:5} {r['concept_accuracy']:8.3f} {r['prompt_fidelity']:7.3f} "
              f"{r['train_seconds']:8.1f} {sps:7.2f} {r['bytes']:11,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ev.json_safe({"args": vars(args), "results": results}), f, indent=1, allow_nan=False)


if __name__ == "__main__":
    main()
