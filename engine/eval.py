"""Customization metrics on the miniature model's world, judged by its probes and tiny-CLIP.

The analogues of the metrics papers report on real models:

| here                         | papers            | what it reads                                          |
|------------------------------|-------------------|--------------------------------------------------------|
| `prompt_fidelity`            | CLIP-T            | share of the prompt's attributes the probes find       |
| `concept_fidelity`           | CLIP-I / DINO     | tiny-CLIP image similarity to the concept's references, |
|                              |                   | and the probes' concept (shape) accuracy                |
| `style_strength`             | style CLIP / Gram | the style probe's confidence for the target style      |
| `content_leakage`            | Pair Cust. §5     | share of images showing the training pair's content    |
|                              |                   | (its shape and colour) when the prompt asks for other; |
|                              |                   | also its shape or its colour alone (`any_leakage`)     |

Images are PIL images, uint8 arrays [N, 32, 32, 3], or float tensors [N, 3, 32, 32] in [-1, 1].
The probes and tiny-CLIP image encoder are the shipped ones (engine/tiny/model/) unless given.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .tiny import world
from .tiny.probes import CLASSES, as_tensor, load_probes

FIDELITY_ATTRIBUTES = ("shape", "colour", "background", "style", "count")
CONTEXT_ATTRIBUTES = ("background", "count", "style")  # what a prompt names besides the concept


def json_safe(obj):
    """Semantics: a copy of `obj` (nested dicts, lists, tuples, scalars) with every non-finite
    float (NaN, ±inf) replaced by None, so `json.dump(..., allow_nan=False)` writes strict JSON.
    A metric is NaN when no image qualified to be scored (e.g. no prompt naming another colour);
    JSON has no NaN, and Python's default writes a token other readers reject."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


@functools.lru_cache(maxsize=2)
def _probes(path=None):
    return load_probes(path)


@functools.lru_cache(maxsize=2)
def image_encoder(model_dir: str | None = None):
    """tiny-CLIP's image tower (CLIPVisionModelWithProjection), float32, eval."""
    from transformers import CLIPVisionModelWithProjection

    from .tiny import SHIPPED_DIR

    path = os.path.join(model_dir or SHIPPED_DIR, "image_encoder")
    m = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    return m.eval().requires_grad_(False)


@torch.no_grad()
def image_embeddings(images, encoder=None, batch_size: int = 256) -> torch.Tensor:
    """L2-normalized tiny-CLIP image embeddings [N, D]. The encoder reads pixels in [-1, 1]
    (no CLIP mean/std normalization: it was trained that way)."""
    enc = encoder or image_encoder()
    x = as_tensor(images)
    out = [enc(pixel_values=x[s : s + batch_size]).image_embeds for s in range(0, len(x), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)


def _read(images, probes):
    return (probes or _probes()).read(images)


def prompt_fidelity(images, prompts, probes=None, attributes=FIDELITY_ATTRIBUTES) -> dict:
    """Share of each prompt's attributes (shape, colour, background, style, count; only those the
    prompt names, see world.parse_prompt) that the probes find in its image. `attributes`
    restricts the attributes scored (the customization protocol scores background, count and
    style: CONTEXT_ATTRIBUTES).

    Returns {"overall": share of all named attributes found, "<attribute>": share for that
    attribute, "n_<attribute>": how many prompts named it, "found": per-image list of dicts}.
    """
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    probs = _read(images, probes)
    hits = {k: [] for k in FIDELITY_ATTRIBUTES}
    found = []
    for i, p in enumerate(prompts):
        named = world.parse_prompt(p)
        row = {}
        for k in attributes:
            if k in named:
                pred = CLASSES[k][int(probs[k][i].argmax())]
                row[k] = pred == named[k]
                hits[k].append(row[k])
        found.append(row)
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}
    out.update({f"n_{k}": len(v) for k, v in hits.items()})
    every = [h for v in hits.values() for h in v]
    out["overall"] = float(np.mean(every)) if every else float("nan")
    out["found"] = found
    return out


def concept_fidelity(images, reference_images, concept: str | None = None, probes=None, encoder=None) -> dict:
    """How much the images look like the concept's reference images.

    image_similarity: mean over images of the mean tiny-CLIP cosine similarity to the references
    (our CLIP-I; our DINO is the same with the probes' features, `probe_similarity`).
    concept_accuracy: share of images whose shape probe reports `concept` (a world.NOVEL_OBJECTS
    name or a shape), when given.
    """
    e = image_embeddings(images, encoder)
    r = image_embeddings(reference_images, encoder)
    out = {"image_similarity": float((e @ r.T).mean())}
    pr = probes or _probes()
    with torch.no_grad():
        fi = torch.nn.functional.normalize(_probe_features(pr, as_tensor(images)), dim=-1)
        fr = torch.nn.functional.normalize(_probe_features(pr, as_tensor(reference_images)), dim=-1)
    out["probe_similarity"] = float((fi @ fr.T).mean())
    if concept is not None:
        if concept not in CLASSES["shape"]:
            raise ValueError(f"concept {concept!r} is not a probe shape class {CLASSES['shape']}")
        probs = _read(images, pr)
        out["concept_accuracy"] = float((probs["shape"].argmax(1) == CLASSES["shape"].index(concept)).mean())
    return out


def _probe_features(probes, x):
    h = probes.features(x)
    return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)


def style_strength(images, style: str, probes=None) -> dict:
    """confidence: mean style-probe probability of `style`; accuracy: share of images whose most
    likely style is `style`."""
    if style not in CLASSES["style"]:
        raise ValueError(f"style {style!r} is not a probe style class {CLASSES['style']}")
    p = _read(images, probes)["style"]
    j = CLASSES["style"].index(style)
    return {"confidence": float(p[:, j].mean()), "accuracy": float((p.argmax(1) == j).mean())}


def content_leakage(images, prompts, content: tuple[str, str], probes=None) -> dict:
    """Semantics: how often images show the training pair's content `content` = (shape, colour)
    where their prompt asks for other content. images: N images (as for the probes); prompts: a
    string or N strings.

    leakage: share of images whose probes read the pair's shape AND colour although the prompt
      asks for another shape or another colour (prompts naming that same content are left out;
      `n` says how many were scored).
    shape_leakage / colour_leakage: share of images whose probes read the pair's shape (colour)
      among the prompts that name another shape (object colour); `n_shape` / `n_colour` count them.
      A style that repaints every object in the pair's colour leaks through colour alone, which
      `leakage` misses.
    any_leakage: share of images with either leak (the pair's shape where the prompt names another
      shape, or its colour where it names another colour), over the prompts naming either
      (`n_any`)."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    shape, colour = content
    probs = _read(images, probes)
    leaked, by_shape, by_colour, either = [], [], [], []
    for i, p in enumerate(prompts):
        named = world.parse_prompt(p)
        s = CLASSES["shape"][int(probs["shape"][i].argmax())]
        c = CLASSES["colour"][int(probs["colour"][i].argmax())]
        other_shape = "shape" in named and named["shape"] != shape
        other_colour = "colour" in named and named["colour"] != colour
        if other_shape:
            by_shape.append(s == shape)
        if other_colour:
            by_colour.append(c == colour)
        if other_shape or other_colour:
            either.append((other_shape and s == shape) or (other_colour and c == colour))
        if named.get("shape") == shape and named.get("colour", colour) == colour:
            continue
        leaked.append(s == shape and c == colour)

    def share(v):
        return float(np.mean(v)) if v else float("nan")

    return {"leakage": share(leaked), "n": len(leaked), "shape_leakage": share(by_shape), "n_shape": len(by_shape),
            "colour_leakage": share(by_colour), "n_colour": len(by_colour), "any_leakage": share(either),
            "n_any": len(either)}


def clip_text_similarity(images, prompts, model_dir: str | None = None) -> float:
    """Mean tiny-CLIP cosine similarity of each image to its prompt (the literal CLIP-T on the
    tiny model's own encoders; prompt_fidelity is the interpretable version)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from .tiny import SHIPPED_DIR

    root = model_dir or SHIPPED_DIR
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    tok = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"), local_files_only=True)
    text = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True,
                                         torch_dtype=torch.float32).eval()
    proj = load_file(os.path.join(root, "clip", "text_projection.safetensors"))["text_projection"].float()
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.nn.functional.normalize(text(ids).pooler_output @ proj.T, dim=-1)
    e = image_embeddings(images, image_encoder(model_dir))
    return float((e * t).sum(-1).mean())


def fidelity_prompts(n: int, seed: int = 100) -> list[tuple[str, int]]:
    """A fixed list of n (prompt, seed) pairs in the base model's seen vocabulary: full captions
    of base-world scenes drawn from stream `seed` (no held-out object or style)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append((world.caption(world.sample_scene(rng)), seed * 1000 + i))
    return out


# ---------------------------------------------------------------------------- customization protocol
@dataclass
class ConceptSet:
    """A held-out object's references and held-out prompts (`concept_set`).

    images: 8 PIL renders [32x32] of the object alone (flat style) on the reference backgrounds;
    masks: 8 float arrays [32, 32] in [0, 1], the object's exact coverage in each;
    templates: 48 (text with "{}" where the concept goes, count) placing it in new contexts —
    backgrounds never used by a reference, one or two of it, sizes, every seen style;
    seeds: one fixed generation seed per prompt;
    contexts: per prompt (count, size, background, style), what `renders` draws.
    """

    name: str
    class_word: str
    images: list
    masks: list
    templates: list
    seeds: list
    reference_backgrounds: tuple
    contexts: list = field(default_factory=list)

    def renders(self) -> list:
        """The held-out prompts drawn by the world itself with the true object (PIL [32x32],
        one per prompt, rendered with the prompt's seed): what a perfect method would generate,
        so the probes' scores of these (after the VAE: `vae_round_trip`) are the protocol's ceiling."""
        out = []
        for (count, size, bg, style), s in zip(self.contexts, self.seeds):
            rng = np.random.default_rng([s])
            scene = world.sample_scene(rng, shape=self.name, count=count, size=size, background=bg, style=style)
            out.append(Image.fromarray(world.render(scene, rng)))
        return out

    def reference_captions(self, phrase: str) -> list[str]:
        """One caption per reference naming what the world drew there: its size (medium has no
        word, as in the held-out prompts), its background and its style, e.g. "a large {phrase} on
        a gray background, flat". Training with these, the placeholder need not absorb the
        background or style (docs/training.md, Custom Diffusion's context drift)."""
        out = []
        for i in range(len(self.images)):
            size, bg = REFERENCE_SIZES[i % 2], self.reference_backgrounds[i % len(self.reference_backgrounds)]
            head = "a" + ("" if size == "medium" else f" {size}")
            out.append(f"{head} {phrase} on {world._article(bg)} {bg} background, flat")
        return out

    def prior_prompts(self, n: int, seed: int = 0) -> list[str]:
        """n class prompts for prior preservation in the world's full-caption grammar ("two small
        red triangles on a gray background, striped"): the class word with a random colour, count,
        size and style, on a background that neither split's prompts use (the references' and
        those holding the object's colours), so no prompt's context is one a test or validation
        prompt names. Deterministic in (object, n, seed)."""
        o = world.NOVEL_OBJECTS[self.name]
        held = set(_new_backgrounds(o))
        bgs = [b for b in world.BACKGROUNDS if b not in held]
        rng = np.random.default_rng([seed, 9000 + world.PROBE_SHAPES.index(self.name)])
        out = []
        for _ in range(n):
            count = int(rng.choice(world.COUNTS))
            size = str(rng.choice(world.SIZE_NAMES if count == 1 else ("small", "medium")))
            bg = str(rng.choice(bgs))
            colour = str(rng.choice([c for c in world.COLOUR_NAMES if c not in world._bg_colours(bg)]))
            style = str(rng.choice(world.STYLES))
            noun = self.class_word if count == 1 else world.PLURALS.get(self.class_word, self.class_word + "s")
            head = ("a" if count == 1 else "two") + ("" if size == "medium" else f" {size}")
            out.append(f"{head} {colour} {noun} on {world._article(bg)} {bg} background, {style}")
        return out

    def prompts(self, phrase: str) -> list[str]:
        """The held-out prompts with `phrase` for the concept ("<new1> star", or "star" for the
        base); a count of two pluralizes the phrase's last word."""
        out = []
        for text, count in self.templates:
            words = phrase.split()
            if count == 2:
                words[-1] = world.PLURALS.get(words[-1], words[-1] + "s")
            out.append(text.format(" ".join(words)))
        return out


REFERENCE_BACKGROUNDS = ("gray", "black", "green", "purple", "pink", "blue", "black to blue gradient",
                         "green to yellow gradient")
REFERENCE_SIZES = ("medium", "large")  # reference i is drawn at REFERENCE_SIZES[i % 2]


def _usable_backgrounds(o) -> list:
    """Backgrounds that share no colour with the object or its accent (the protocol's)."""
    return [b for b in world.BACKGROUNDS if not {o.colour, o.accent} & set(world._bg_colours(b))]


def _new_backgrounds(o) -> list:
    """The backgrounds of both splits' prompts: usable, and used by no reference."""
    return [b for b in _usable_backgrounds(o) if b not in REFERENCE_BACKGROUNDS]


def concept_set(obj: str, seed: int = 0, split: str = "test") -> ConceptSet:
    """The customization protocol's data for one held-out object (world.NOVEL_OBJECTS: sparkle,
    moon, arrow; the base model never saw them): 8 reference renders with exact masks and 48
    held-out prompts. Deterministic in (obj, seed).

    split="test" gives the protocol's 48 prompts and seeds (what results are reported on);
    split="validation" gives 48 prompts over the contexts no test prompt uses (fewer than 48, so
    some repeat, each time with its own seed), other seeds and the same references: for choosing
    recipes and operating points without looking at the test set.
    """
    if obj not in world.NOVEL_OBJECTS:
        raise ValueError(f"concept_set: {obj!r} is not a held-out object {tuple(world.NOVEL_OBJECTS)}")
    if split not in ("test", "validation"):
        raise ValueError(f"concept_set: split must be 'test' or 'validation', got {split!r}")
    o = world.NOVEL_OBJECTS[obj]
    usable = _usable_backgrounds(o)
    ref_bgs = tuple(b for b in REFERENCE_BACKGROUNDS if b in usable)
    new_bgs = _new_backgrounds(o)
    images, masks = [], []
    for i in range(8):
        rng = np.random.default_rng([seed, 5000 + world.PROBE_SHAPES.index(obj), i])
        scene = world.sample_scene(rng, shape=obj, count=1, size=REFERENCE_SIZES[i % 2], style="flat",
                                   background=ref_bgs[i % len(ref_bgs)])
        image, mask = world.render_with_mask(scene, rng)
        images.append(Image.fromarray(image))
        masks.append(mask)
    rng = np.random.default_rng([seed, 6000 + world.PROBE_SHAPES.index(obj)])
    combos = [(count, size, bg, style) for count in world.COUNTS
              for size in (world.SIZE_NAMES if count == 1 else ("small", "medium"))
              for bg in new_bgs for style in world.STYLES]
    templates, contexts = [], []
    # One permutation for both splits, so the test prompts never change and validation's are disjoint.
    order = rng.permutation(len(combos))
    rest = order[48:]  # the contexts no test prompt uses; fewer than 48, so validation cycles them
    if split == "validation" and not len(rest):
        raise ValueError(f"concept_set: {obj!r} has only {len(combos)} contexts, none left for validation")
    picked = order[:48] if split == "test" else [rest[i % len(rest)] for i in range(48)]
    for j in picked:  # 48 distinct contexts for the test split
        count, size, bg, style = combos[int(j)]
        head = ("a" if count == 1 else "two") + ("" if size == "medium" else f" {size}")
        templates.append((f"{head} {{}} on {world._article(bg)} {bg} background, {style}", count))
        contexts.append(combos[int(j)])
    seeds = [seed * 100_000 + (7_000 if split == "test" else 8_000) + i for i in range(48)]
    return ConceptSet(obj, o.supercategory, images, masks, templates, seeds, ref_bgs, contexts)


def linear_probe(x: torch.Tensor, y: torch.Tensor, fit: int, classes: int, iters: int = 500) -> torch.Tensor:
    """Semantics: what a representation carries linearly. Softmax regression (features
    standardized on the fit rows, Adam 1e-2, `iters` full-batch steps, seed 0) fit on the first
    `fit` rows of x [N, E] with labels y [N] in [0, classes); returns its hits on the other rows,
    Shape [N - fit] bool (the accuracy is their mean)."""
    mu, sd = x[:fit].mean(0), x[:fit].std(0) + 1e-6
    z = (x - mu) / sd
    g = torch.Generator().manual_seed(0)
    w = (0.01 * torch.randn(x.shape[1], classes, generator=g)).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], 1e-2)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(z[:fit] @ w + b, y[:fit]).backward()
            opt.step()
    with torch.no_grad():
        return (z[fit:] @ w + b).argmax(1) == y[fit:]


def concept_accuracy(images, obj: str, probes=None) -> float:
    """Concept fidelity of the protocol: the share of images in which the probes' shape head reads `obj`."""
    if obj not in CLASSES["shape"]:
        raise ValueError(f"concept {obj!r} is not a probe shape class {CLASSES['shape']}")
    probs = _read(images, probes)
    return float((probs["shape"].argmax(1) == CLASSES["shape"].index(obj)).mean())


@torch.no_grad()
def vae_round_trip(vae, images) -> list:
    """Semantics: decode(mean of encode(x)) per image, clamped to [-1, 1], back to PIL: what the
    base's VAE keeps of an image, the ceiling on anything the UNet can generate.

    vae: a diffusers AutoencoderKL; images: as for the probes (PIL, uint8 [N, 32, 32, 3] or
    float [N, 3, 32, 32] in [-1, 1]). Returns N PIL images.
    """
    p = next(vae.parameters())
    x = as_tensor(images).to(p.device, p.dtype)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1).cpu()
    a = ((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(im) for im in a]


# ---------------------------------------------------------------------------- Pair Customization protocol
PAIR_STYLES = ("wavy", "checkered", "pixelated", "banded")  # held out from the base; probes know them


def style_pair(style: str, seed: int = 0):
    """One training pair of the miniature world: (plain PIL, styled PIL, content prompt, (shape,
    colour)) — a large green heart on a blue-to-white gradient, flat and in `style`."""
    if style not in PAIR_STYLES:
        raise ValueError(f"style {style!r} is not a held-out style {PAIR_STYLES}")
    rng = np.random.default_rng([seed, 0])
    scene = world.sample_scene(rng, shape="heart", colour="green", background="blue to white gradient", count=1,
                               size="large", style=style)
    plain, styled = world.render_pair(scene, seed)
    return Image.fromarray(plain), Image.fromarray(styled), "a large green heart on a blue to white gradient background", ("heart", "green")


def pair_prompts(n: int, content=("heart", "green"), seed: int = 300) -> list[tuple[str, int]]:
    """n held-out (prompt, seed) pairs: one object of another shape AND another colour than the
    pair's content, on any background, no style word (style guidance adds the style)."""
    out, i = [], 0
    while len(out) < n:
        rng = np.random.default_rng([seed, i])
        shape = str(rng.choice([s for s in world.SHAPES if s != content[0]]))
        colour = str(rng.choice([c for c in world.COLOURS if c != content[1]]))
        background = str(rng.choice([b for b in world.BACKGROUNDS if b != colour]))
        out.append((f"a {colour} {shape} on a {background} background", seed * 1000 + i))
        i += 1
    return out


def vae_ceiling(vae, style: str, n: int = 48, seed: int = 9, probes=None) -> float:
    """style_strength accuracy of n styled world renders after a VAE encode -> decode (mean
    latent): the most a generated image can show of `style` through this VAE."""
    ims = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        ims.append(world.render_pair(world.sample_scene(rng, count=1, size="large", style=style), i)[1])
    x = torch.from_numpy(np.stack(ims)).float().permute(0, 3, 1, 2).div(127.5).sub(1).to(vae.device, vae.dtype)
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.float()
    rec = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return style_strength(rec, style, probes)["accuracy"]

# ---------------------------------------------------------------------------- zero-shot (encoder adapters)
def masked_reference(cs: ConceptSet, i: int = 0) -> Image.Image:
    """Reference i of a concept set with its background masked out (mid-gray, as the encoder
    adapter's training references are): the one image a zero-shot request gives."""
    from .tiny import references

    return Image.fromarray(references.masked_reference(np.asarray(cs.images[i]), cs.masks[i]))


def zero_shot_requests(cs: ConceptSet, adapter: str | None, *, scale: float = 1.0, n: int = 48, steps: int = 25,
                       guidance: float = 7.5, reference: int = 0) -> list:
    """The protocol's first n held-out prompts with the class word as the phrase ("a star on ..."),
    each with the masked reference `reference` as ip_adapter_image and (adapter, scale), or the
    plain base requests when adapter is None; the protocol's seeds."""
    from .api import Request

    image = masked_reference(cs, reference)
    out = []
    for p, s in list(zip(cs.prompts(cs.class_word), cs.seeds))[:n]:
        if adapter is None:
            out.append(Request(p, seed=s, steps=steps, guidance=guidance))
        else:
            out.append(Request(p, adapters=[(adapter, scale)], ip_adapter_image=image, seed=s, steps=steps,
                               guidance=guidance))
    return out


def copy_paste(images, prompts, reference_size: str, reference_count: int, probes=None) -> dict:
    """Copy-paste, the failure cross-reference regularization targets: among images whose prompt
    asks for another size or count than the reference shows (a prompt without a size word asks
    for "medium"), the share whose probes read the reference's own size AND count instead.
    Returns {"copy_paste": share, "n": images scored}."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    probs = _read(images, probes)
    copied = []
    for i, p in enumerate(prompts):
        named = world.parse_prompt(p)
        asked = (named.get("size", "medium"), named.get("count", 1))
        if asked == (reference_size, reference_count):
            continue
        size = CLASSES["size"][int(probs["size"][i].argmax())]
        count = CLASSES["count"][int(probs["count"][i].argmax())]
        copied.append((size, count) == (reference_size, reference_count))
    return {"copy_paste": float(np.mean(copied)) if copied else float("nan"), "n": len(copied)}
