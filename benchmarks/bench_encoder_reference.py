"""What the encoder adapter can take from a reference image on the miniature world.

Three measurements; the first two on seen shapes only (the held-out objects stay out of them):

    information   how well a frozen tiny image encoder's `image_embeds` (the base variant's
                  only input; --image-encoder, default the shipped adapter's
                  ip_adapter/image_encoder/) encode a masked reference's shape and colour: a linear probe
                  (softmax regression, standardized features) fit on `--fit` cross-reference
                  references of stream 3 and scored on `--test` more (also the reference's
                  size and position, what copy-paste would copy). No adapter can copy an
                  attribute from the reference that this embedding does not carry. For
                  comparison, the same probe on the penultimate hidden states (all 65 tokens,
                  flattened: what the Plus variant's Resampler reads; and the patch tokens
                  mean-pooled over a 2x2 grid, `patch_grid`, with the geometry probe on it too). "geometry": one 11-way
                  probe over the 8 seen shapes and the 3 held-out objects' outlines (drawn in
                  seen colours, so colour does not name them), scored on the seen and the
                  held-out test rows apart: does the embedding separate shapes it never saw.
    follow        whether generations take what the prompt leaves open from the reference: the
                  prompt names a shape and no colour ("a star on a blue background, flat"), the
                  reference is that shape in one of 4 colours; "colour" = share of images whose
                  colour probe reads the reference's colour. "swap": the prompt names a category
                  word (star / circle / triangle), the reference is another shape of the category
                  (cross / heart / hexagon / diamond; engine/train/encoder.py CATEGORY); "shape" =
                  share whose shape probe reads the reference's shape. The base (no adapter) row
                  is the chance level of each.

    validation    (--validation) zero-shot concept / prompt fidelity of --files on
                  concept_set(obj, split="validation"), 25 steps: what checkpoints are chosen on.

    python benchmarks/bench_encoder_reference.py [--files A.safetensors=label ...] [--steps 10]
    python benchmarks/bench_encoder_reference.py --information-only [--image-encoder FOLDER]
    python benchmarks/bench_encoder_reference.py --validation --files A.safetensors=label ...
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from PIL import Image

import impasto
from impasto import eval as ev
from impasto.adapters import encoder as encoder_format
from impasto.tiny import SHIPPED_DIR, references, world

COLOURS = ("red", "green", "yellow", "white")
FOLLOW = (("star", "blue"), ("heart", "black"), ("circle", "purple"), ("square", "gray"))
SWAP = (("star", "cross", "white"), ("circle", "heart", "red"), ("circle", "hexagon", "green"),
        ("triangle", "diamond", "yellow"))
SWAP_BGS = ("blue", "black", "gray", "pink", "purple", "orange")


def linear_probe(x: torch.Tensor, y: torch.Tensor, fit: int, classes: int) -> float:
    """Test accuracy of `eval.linear_probe` fit on the first `fit` rows of x [N, E], labels y [N]."""
    return float(ev.linear_probe(x, y, fit, classes).float().mean())


def geometry_reference(geometry: str, rng: np.random.Generator) -> np.ndarray:
    """A masked reference (world gray around the object) of a bare `geometry` (a world.POLYGONS
    name, "circle" or "crescent") in a random seen colour, flat, random size and position: for the
    held-out geometries this is their outline alone, without the held-out objects' fixed colours
    (which would give them away by colour)."""
    scene = world.sample_scene(rng, shape="circle", count=1, style="flat")  # size, position, colour
    centres = world._centres(scene, rng)
    m = world._mask(geometry, centres, world.SIZES[scene.size])
    img = world._rgb(scene.colour) * m + references.GRAY / 255 * (1 - m)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


HELD_OUT_GEOMETRIES = tuple(o.shape for o in world.NOVEL_OBJECTS.values())  # sparkle, crescent, arrow


def information(engine, fit: int, test: int, image_encoder=None) -> dict:
    from impasto.train.encoder import EncoderAdapter

    method = EncoderAdapter(engine, image_encoder=image_encoder)
    embed = lambda refs: torch.cat([method.embed(refs[i:i + 200], np.zeros(len(refs[i:i + 200]), bool))  # noqa: E731
                                    for i in range(0, len(refs), 200)])
    pairs = references.cross_reference_pairs(3, fit + test)
    refs = [p.reference for p in pairs]
    e = embed(refs)
    shape = torch.tensor([world.SHAPES.index(p.scene.shape) for p in pairs])
    colour = torch.tensor([world.COLOUR_NAMES.index(p.scene.colour) for p in pairs])
    # what copy-paste would copy: the reference's own size and position (its count is always one)
    size = torch.tensor([world.SIZE_NAMES.index(p.reference_scene.size) for p in pairs])
    position = torch.tensor([world.POSITIONS.index(p.reference_scene.position) for p in pairs])
    px = [encoder_format.pixels(method.processor, [Image.fromarray(r) for r in refs[i:i + 200]])
          for i in range(0, len(refs), 200)]
    hidden = lambda xs: torch.cat([method.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # noqa: E731
                                   for x in xs]).float()
    with torch.no_grad():  # what IP-Adapter Plus reads instead: the penultimate hidden states, all tokens
        hs = hidden(px)
    h = hs.flatten(1)
    # held-out shapes: 11 geometries (8 seen, the 3 held-out objects' outlines in seen colours),
    # one probe fit on all of them, scored apart on the seen and the held-out rows of the test set
    geos = world.SHAPES + HELD_OUT_GEOMETRIES
    gy = torch.arange(fit + test) % len(geos)
    gref = [geometry_reference(geos[int(k)], np.random.default_rng([31, i])) for i, k in enumerate(gy)]
    ge = embed(gref)
    held = gy[fit:] >= len(world.SHAPES)
    with torch.no_grad():
        gh = hidden([encoder_format.pixels(method.processor, [Image.fromarray(r) for r in gref[i:i + 200]])
                     for i in range(0, len(gref), 200)])
    return {"shape_from_patch_grid": linear_probe(patch_grid(hs), shape, fit, len(world.SHAPES)),
            **{f"{k}_from_patch_grid": v for k, v in _split_probe(patch_grid(gh), gy, fit, len(geos), held).items()},
            "shape": linear_probe(e, shape, fit, len(world.SHAPES)), "shape_chance": 1 / len(world.SHAPES),
            "shape_from_hidden_states": linear_probe(h.float(), shape, fit, len(world.SHAPES)),
            "colour": linear_probe(e, colour, fit, len(world.COLOUR_NAMES)),
            "colour_chance": 1 / len(world.COLOUR_NAMES),
            "size": linear_probe(e, size, fit, len(world.SIZE_NAMES)),
            "size_majority": float(max((size[fit:] == k).float().mean() for k in range(len(world.SIZE_NAMES)))),
            "position": linear_probe(e, position, fit, len(world.POSITIONS)),
            "position_majority": float(max((position[fit:] == k).float().mean() for k in range(len(world.POSITIONS)))),
            **_split_probe(ge, gy, fit, len(geos), held), "geometry_chance": 1 / len(geos),
            "fit": fit, "test": test}


def patch_grid(hidden: torch.Tensor, grid: int = 2) -> torch.Tensor:
    """Semantics: hidden [N, 1 + P·P, D] (the class token, then the P×P patch tokens row-major)
    -> [N, grid·grid·D]: the patch tokens mean-pooled over a grid×grid partition of the image (the
    silhouette's layout at a resolution a 900-row probe can fit; all 65 tokens flattened are
    4,160 features)."""
    n, t, d = hidden.shape
    side = int(round((t - 1) ** 0.5))
    if side * side != t - 1 or side % grid:
        raise ValueError(f"patch_grid: {t - 1} patch tokens are not a square divisible by {grid}")
    x = hidden[:, 1:].reshape(n, grid, side // grid, grid, side // grid, d)
    return x.mean(dim=(2, 4)).flatten(1)


def _split_probe(x, y, fit, classes, held) -> dict:
    """linear_probe's accuracy over all test rows, and over its seen / held-out rows apart."""
    hit = ev.linear_probe(x, y, fit, classes)
    return {"geometry_all": float(hit.float().mean()), "geometry_seen": float(hit[~held].float().mean()),
            "geometry_held_out": float(hit[held].float().mean())}


def _request(prompt, seed, steps, name, ref):
    extra = {} if name is None else dict(adapters=[(name, 1.0)], ip_adapter_image=Image.fromarray(ref))
    return impasto.Request(prompt, seed=seed, steps=steps, guidance=7.5, **extra)


def _read(engine, reqs, head):
    outs = engine.generate_batch(reqs)
    for o in outs:
        if o.error is not None:
            raise o.error
    probs = ev._read([o.images[0] for o in outs], None)
    return [ev.CLASSES[head][i] for i in probs[head].argmax(1)]


def follow(engine, name, steps: int, per: int) -> dict:
    reqs, want = [], []
    for c in COLOURS:
        for j, (shape, bg) in enumerate(FOLLOW):
            reqs.append(_request(f"a {shape} on a {bg} background, flat", 900 + j, steps, name,
                                 references.object_reference(shape, seed=20 + j, colour=c)))
            want.append(c)
    colour = float(np.mean([g == w for g, w in zip(_read(engine, reqs, "colour"), want)]))
    reqs, want = [], []
    for word, shape, c in SWAP:
        ref = references.object_reference(shape, seed=11, colour=c)
        for j in range(per):
            bg = [b for b in SWAP_BGS if b != c][j % 5]
            reqs.append(_request(f"a {word} on a {bg} background, flat", 500 + j, steps, name, ref))
            want.append(shape)
    got = _read(engine, reqs, "shape")
    return {"colour": colour, "shape": float(np.mean([g == w for g, w in zip(got, want)])),
            "n_colour": len(COLOURS) * len(FOLLOW), "n_shape": len(want)}


def validation(files, steps: int, objects=tuple(world.NOVEL_OBJECTS), base: bool = True) -> dict:
    """Zero-shot scores of each adapter file on concept_set(obj, split="validation") (48 prompts over
    contexts no test prompt uses, their own seeds; the first masked reference, scale 1): what
    checkpoints and recipes are chosen on, so the test split (bench_training.py) is scored once."""
    out = {}
    engine = impasto.Engine.from_pretrained("tiny", device="cpu")
    for i, spec in enumerate(([None] if base else []) + list(files)):
        path, _, label = (spec or "").partition("=")
        name = None
        if spec is not None:
            name = f"val{i}"
            engine.adapters.register(name, path)
        row = {}
        for obj in objects:
            cs = ev.concept_set(obj, split="validation")
            outs = engine.generate_batch(ev.zero_shot_requests(cs, name, steps=steps))
            for o in outs:
                if o.error is not None:
                    raise o.error
            images = [o.images[0] for o in outs]
            row[obj] = (ev.concept_accuracy(images, obj),
                        ev.prompt_fidelity(images, cs.prompts(cs.class_word), attributes=ev.CONTEXT_ATTRIBUTES)["overall"])
        row["mean"] = tuple(float(np.mean([row[o][k] for o in objects])) for k in (0, 1))
        out[label or path or "base"] = row
        print(f"{label or path or 'base':24} validation concept / prompt: "
              + "  ".join(f"{k} {c:.3f}/{p:.3f}" for k, (c, p) in row.items()), flush=True)
        if name is not None:
            engine.adapters.unregister(name)
    engine.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="*", default=None, help="FILE[=LABEL] encoder adapters (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (follow checks: 10, validation: 25)")
    p.add_argument("--per", type=int, default=4, help="swap: images per (category, shape)")
    p.add_argument("--fit", type=int, default=900)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--json", default=None)
    p.add_argument("--image-encoder", default=None, help="information: the image-encoder folder probed (default: "
                   "the shipped adapter's, ip_adapter/image_encoder/, else the model's image_encoder/)")
    p.add_argument("--information-only", action="store_true", help="skip the generation checks")
    p.add_argument("--no-base", action="store_true", help="validation: skip the base row (no adapter; "
                   "0.035 / 0.785 on every run so far: its requests do not change)")
    p.add_argument("--validation", action="store_true", help="instead: score --files zero-shot on the "
                   "validation split (25 sampling steps unless --steps)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    files = args.files or [os.path.join(SHIPPED_DIR, "ip_adapter", "ip_adapter.safetensors") + "=shipped"]
    if args.validation:
        out = {"validation": validation(files, args.steps or 25, base=not args.no_base)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return
    engine = impasto.Engine.from_pretrained("tiny", device="cpu")
    tower = args.image_encoder
    if tower is None and os.path.isdir(os.path.join(SHIPPED_DIR, "ip_adapter", "image_encoder")):
        tower = os.path.join(SHIPPED_DIR, "ip_adapter", "image_encoder")  # the shipped adapter's own
    out = {"information": information(engine, args.fit, args.test, tower), "follow": {}}
    print("image_embeds linear probe:", json.dumps(out["information"]), flush=True)
    if args.information_only:
        files = []
    for i, spec in enumerate(([None] + files) if files else []):
        path, _, label = (spec or "").partition("=")
        name = None
        if spec is not None:
            name = f"enc{i}"
            engine.adapters.register(name, path)
        row = follow(engine, name, args.steps or 10, args.per)
        out["follow"][label or path or "base"] = row
        print(f"{label or path or 'base':24} colour follows the reference {row['colour']:.3f} (of {row['n_colour']})  "
              f"shape follows the reference {row['shape']:.3f} (of {row['n_shape']})", flush=True)
    engine.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
