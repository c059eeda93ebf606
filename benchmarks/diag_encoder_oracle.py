"""Diagnostic (never shipped): the oracle encoder adapter, trained WITH the held-out objects.

The shipped encoder adapter is trained on the 8 seen shapes only and scored zero-shot on the 3
held-out objects. Its held-out concept fidelity stays low while a seen reference's shape follows
(docs/training.md, "The encoder adapter"). Two causes are possible:

    the adapter     trained on 8 shapes, it acts as a classifier over them and maps a new
                    silhouette to the nearest seen one (sparkle -> cross);
    the frozen UNet it has only drawn the 8 seen shapes, and 4 (or 16) extra cross-attention
                    tokens cannot make it draw another.

This run separates them: the same recipe (`impasto.train.encoder`, the same tower, coarse
captions, dropping, cross-reference) on a stream where a share `--novel` of the scenes is one of
the held-out objects (`world.sample_scene(novel_objects=...)`; default 3/11, each held-out object
as frequent as a seen shape). The frozen UNet, text encoder and image tower are unchanged: only
the adapter sees the held-out objects. If this oracle's held-out concept fidelity stays low, the
frozen UNet is the limit of the design on this world; if it rises far, the adapter's
generalization from 8 shapes is.

The held-out objects' captions name them by their own word ("a sparkle on ..."; colour is fixed
and never named); their coarse captions use the supercategory (sparkle -> "star", moon ->
"circle", arrow -> "triangle"), the word the zero-shot prompts use.

    python benchmarks/diag_encoder_oracle.py -o OUT --steps 1000 --checkpoint-every 500 \\
        [--image-encoder engine/tiny/model/ip_adapter/image_encoder] [--novel 0.2727] [--plus]
    python benchmarks/bench_encoder_reference.py --validation --files OUT/...=oracle
"""

from __future__ import annotations

import argparse
import importlib
import os

from impasto.tiny import SHIPPED_DIR, references, world
enc = importlib.import_module("impasto.train.encoder")  # the module (impasto.train.encoder is also the function)


def novel_coarse_caption(original):
    """coarse_caption, extended to the held-out objects (their name -> their supercategory)."""

    def coarse(caption: str, scene: world.Scene, mode: str) -> str:
        if scene.shape not in world.NOVEL_OBJECTS or mode == "full" or not caption:
            return original(caption, scene, mode)
        noun = scene.shape if scene.count == 1 else enc._plural(scene.shape)
        if f" {noun} " not in caption:
            raise ValueError(f"oracle: {noun!r} not in the caption {caption!r}")
        word = world.NOVEL_OBJECTS[scene.shape].supercategory
        new = (f" {word if scene.count == 1 else enc._plural(word)} ") if mode == "category" else " "
        return enc.swap_object(caption, f" {noun} ", new)

    return coarse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--novel", type=float, default=3 / 11, help="share of scenes that are a held-out object")
    p.add_argument("--image-encoder", default=os.path.join(SHIPPED_DIR, "ip_adapter", "image_encoder"))
    p.add_argument("--plus", action="store_true")
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.novel <= 1:
        raise SystemExit(f"--novel: expected a share in (0, 1], got {args.novel}")
    pairs = references.cross_reference_pairs
    # the stream's one draw of the object: with probability --novel a held-out object
    references.cross_reference_pairs = lambda seed, n, **kw: pairs(seed, n, novel_objects=args.novel, **kw)
    enc.coarse_caption = novel_coarse_caption(enc.coarse_caption)
    r = enc.encoder("tiny", steps=args.steps, output=args.output, image_encoder=args.image_encoder,
                    checkpoint_every=args.checkpoint_every, resume=args.resume,
                    variant=enc.encoder_format.PLUS if args.plus else enc.encoder_format.BASE)
    print("oracle adapter:", r.files)


if __name__ == "__main__":
    main()
