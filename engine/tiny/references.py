"""Reference renders for the miniature encoder (Taming Encoder's recipe on the world of world.py).

Training an encoder adapter needs, per sample, a denoising target and a *reference* of the same
object. Jia et al. add two things to IP-Adapter's recipe, and this module supplies the data for
both; the training loop itself lives with the training core:

* cross-reference regularization — the reference is another render of the same object (other
  position, size, background, jitter) than the target, so copying the reference's pixels does
  not lower the loss (`cross_reference_pairs`);
* the object alone — the reference's background is masked out (`render_with_mask` gives the
  object's coverage; `masked_reference` replaces the rest with mid-gray, which the tiny image
  encoder's processor maps to 0, the "zero image" of IP-Adapter Plus's unconditional branch).

An object is a (shape, colour, style) of the world: seen shapes in any colour, or one of the
held-out NOVEL_OBJECTS (fixed colours) for zero-shot evaluation. Everything is a pure function of
its seeds, as the world is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import outlines, world

GRAY = 128  # a masked-out pixel: (128/255 - 0.5)/0.5 ≈ 0 after the tiny encoder's processor


def render_with_mask(scene: world.Scene, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [32, 32, 3], object coverage float32 [32, 32] in [0, 1]) of `scene` rendered
    with rng seed `seed`: the image is exactly `world.render(scene, default_rng(seed))`, the mask
    the anti-aliased coverage of its object(s) at the same jittered centres."""
    image = world.render(scene, np.random.default_rng(seed))
    centres = world._centres(scene, np.random.default_rng(seed))  # render draws the centres first
    r = world.SIZES[scene.size]
    mask = world._mask(world._geometry_shape(scene), centres, r)[..., 0]
    return image, mask


def masked_reference(image: np.ndarray, mask: np.ndarray, fill: int = GRAY) -> np.ndarray:
    """Semantics: out = image·m + fill·(1 − m) per pixel, m = mask[..., None]; uint8 [32, 32, 3]."""
    m = mask[..., None].astype(np.float32)
    return (image.astype(np.float32) * m + fill * (1 - m) + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Pair:
    """One training sample: the denoising target and a masked reference of the same object."""

    target: np.ndarray  # uint8 [32, 32, 3]
    caption: str  # the target's caption (with random omissions, as the base was trained)
    reference: np.ndarray  # uint8 [32, 32, 3], background masked out
    scene: world.Scene  # the target's
    reference_scene: world.Scene


def cross_reference_pairs(seed: int, n: int, *, start: int = 0, same_render: bool = False,
                          novel_objects: float = 0.0) -> list[Pair]:
    """n samples of stream `seed`: a target scene and, for its object, a reference scene of one
    object with size, position and background drawn again (and another render seed), masked.

    same_render=True gives IP-Adapter's recipe instead (the reference is the target itself,
    masked): the ablation without cross-reference regularization.
    """
    out = []
    for i in range(start, start + n):
        rng = np.random.default_rng([seed, i])
        out.append(_pair(rng, world.sample_scene(rng, novel_objects=novel_objects), same_render))
    return out


def _pair(rng: np.random.Generator, scene: world.Scene, same_render: bool) -> Pair:
    """The target render of `scene`, its caption and a masked reference of the same object,
    drawn from `rng` in this order (the streams depend on it)."""
    target_seed = int(rng.integers(2**31))
    target = world.render(scene, np.random.default_rng(target_seed))
    cap = world.caption(scene, rng)
    if same_render:
        ref_scene, ref_seed = scene, target_seed
    else:
        other = world.sample_scene(rng, shape=scene.shape, colour=scene.colour, style=scene.style, count=1)
        ref_scene, ref_seed = replace(other, count=1), int(rng.integers(2**31))
    image, mask = render_with_mask(ref_scene, ref_seed)
    return Pair(target, cap, masked_reference(image, mask), scene, ref_scene)


def outline_pair(seed: int, step: int, row: int, *, same_render: bool = False) -> Pair:
    """Row `row` of batch `step`'s procedural stream (outlines.py): a target scene whose shape is a
    procedural outline (`outlines.draw_seed`: never near a held-out silhouette), a random colour,
    size, count, position, background and style as the world draws for a seen shape, and a masked
    reference of the SAME outline, colour and style (size, position, background drawn again), as
    `cross_reference_pairs` pairs them. Its caption names the shape "outline-<seed>" (the encoder
    rewrites it). A pure function of (seed, step, row); same_render as for cross_reference_pairs."""
    rng = np.random.default_rng([seed, step, 5, row])
    return _pair(rng, world.sample_scene(rng, shape=outlines.name(outlines.draw_seed(rng))), same_render)


def object_reference(shape: str, seed: int = 0, **scene) -> np.ndarray:
    """One masked reference render of object `shape` (a seen shape, or a NOVEL_OBJECTS name),
    medium size, centred unless `scene` fixes other attributes: the one image a zero-shot request gives."""
    position = scene.pop("position", "center")
    rng = np.random.default_rng([seed, 0])
    s = world.sample_scene(rng, shape=shape, count=1, size=scene.pop("size", "medium"), **scene)
    image, mask = render_with_mask(replace(s, position=position), seed)
    return masked_reference(image, mask)


# IP-Adapter's tutorial_train.py draws once per sample: < 0.05 image dropped, < 0.10 text
# dropped, < 0.15 both (marginals 10 % each). Taming Encoder's object-embedding dropping is the
# image drop: it keeps text-only behaviour and makes guidance over the image possible.
DROP_IMAGE, DROP_TEXT, DROP_BOTH = 0.05, 0.05, 0.05


def training_batch(seed: int, step: int, batch_size: int, *, cross_reference: bool = True,
                   drop_rates: tuple = (DROP_IMAGE, DROP_TEXT, DROP_BOTH)) -> dict:
    """Batch `step` of stream `seed` for training an encoder adapter on the seen world.

    Returns {"targets": float32 [B, 3, 32, 32] in [-1, 1], "captions": B strings ("" where the
    text is dropped), "references": B uint8 [32, 32, 3] masked references, "drop_image": bool [B]
    (the object embedding to drop: zero embedding for the base variant), "scenes": B Scenes}.
    cross_reference=False: the reference is the target's own render (the ablation).
    drop_rates: (image only, text only, both); (0, 0, 0) for the ablation without dropping.
    """
    pairs = cross_reference_pairs(seed, batch_size, start=step * batch_size, same_render=not cross_reference)
    rng = np.random.default_rng([seed, step, 1])
    u = rng.random(batch_size)
    image_only, text_only, both = drop_rates
    drop_image = (u < image_only) | ((u >= image_only + text_only) & (u < image_only + text_only + both))
    drop_text = (u >= image_only) & (u < image_only + text_only + both)
    targets = np.stack([p.target for p in pairs]).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1
    return {"targets": targets, "captions": ["" if d else p.caption for p, d in zip(pairs, drop_text)],
            "references": [p.reference for p in pairs], "drop_image": drop_image, "scenes": [p.scene for p in pairs]}
