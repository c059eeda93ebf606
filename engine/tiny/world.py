"""The miniature model's world: a deterministic, seeded generator of captioned 32x32 images.

A scene is one or two objects of one shape and colour, of a size, at a position, on a plain or
gradient background, rendered in a style. Captions are plain English:

    "two small red stars on a blue background, striped"

Everything is a pure function of (seed, index): `sample_scene(np.random.default_rng([seed, i]))`,
so any split can be regenerated bit for bit, in any order.

Vocabulary
----------
- SHAPES (8, seen by the base model): circle square triangle star heart hexagon diamond cross.
- COLOURS (8, object colours): red green blue yellow orange purple pink white.
- BACKGROUNDS (14): the 8 colours plain, black, gray, and 4 vertical gradients.
- SIZES: small, medium (no word, or "medium"), large; COUNTS: one ("a") or two.
- POSITIONS: center, left, right, top, bottom (named in a caption only sometimes).
- STYLES (5, seen): flat striped dotted outlined noisy.

Held out from base training, reserved for customization (the probes know them, the base never
sees them):
- NOVEL_OBJECTS (3): each a shape the base never sees with a fixed colour and accent, and a
  super-category word for Perfusion's key-locking: sparkle (a four-point star; "star"),
  moon (a crescent; "circle"), arrow (an arrow; "triangle").
- NOVEL_STYLES (3): checkered (object fill), pixelated (2 px mosaic), wavy (rows displaced by a
  sine); `render_pair` draws one scene plain (flat) and styled, for Pair Customization.
- EXTRA_STYLES (1): banded (the object filled with 6-px horizontal bands of its second tone), a
  held-out style coarse enough for the VAE to carry (the 2-px checkered and pixelated are mostly
  lost in its 4x downsampling). Added after the world's streams were fixed, so `sample_scene`
  never draws it: it appears only where a caller names it (`style="banded"`), and every stream
  draws exactly what it drew before (tests/test_tiny_world.py keeps their digests). Its probe
  class was added to the shipped probes' style head alone (engine/tiny/probes.py `add_style_class`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from . import outlines  # imports world only inside its functions

SIZE = 32  # image side, pixels (32: trainable on a shared 2-core CPU in ~1.5 h; see docs/tiny.md)
SS = 4  # supersampling factor for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon", "diamond", "cross")
COLOURS = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 30),
    "orange": (245, 140, 20),
    "purple": (135, 50, 185),
    "pink": (245, 135, 195),
    "white": (245, 245, 245),
}
COLOUR_NAMES = tuple(COLOURS)
EXTRA_BG = {"black": (20, 20, 20), "gray": (128, 128, 128)}
GRADIENTS = {  # name -> (top colour, bottom colour); caption "on a blue to white gradient background"
    "blue to white gradient": ("blue", "white"),
    "orange to purple gradient": ("orange", "purple"),
    "green to yellow gradient": ("green", "yellow"),
    "black to blue gradient": ("black", "blue"),
}
BACKGROUNDS = COLOUR_NAMES + tuple(EXTRA_BG) + tuple(GRADIENTS)
SIZES = {"small": 5.0, "medium": 7.5, "large": 10.5}  # circumscribed radius, pixels
SIZE_NAMES = tuple(SIZES)
POSITIONS = ("center", "left", "right", "top", "bottom")
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
STYLES = ("flat", "striped", "dotted", "outlined", "noisy")
NOVEL_STYLES = ("checkered", "pixelated", "wavy")
EXTRA_STYLES = ("banded",)  # never drawn at random: see the module docstring
ALL_STYLES = STYLES + NOVEL_STYLES + EXTRA_STYLES
COUNTS = (1, 2)


@dataclass(frozen=True)
class NovelObject:
    name: str  # the word a prompt uses for it
    shape: str  # a geometry the base never sees
    colour: str
    accent: str  # colour of the inner, smaller copy of the shape
    supercategory: str  # Perfusion's key-locking word


NOVEL_OBJECTS = {
    "sparkle": NovelObject("sparkle", "sparkle", "yellow", "orange", "star"),
    "moon": NovelObject("moon", "crescent", "white", "blue", "circle"),
    "arrow": NovelObject("arrow", "arrow", "red", "white", "triangle"),
}
# Probe classes for shape: the 8 seen shapes, then the novel objects by name.
PROBE_SHAPES = SHAPES + tuple(NOVEL_OBJECTS)

PLURALS = {"cross": "crosses"}


@dataclass(frozen=True)
class Scene:
    shape: str  # one of SHAPES, or a NOVEL_OBJECTS name
    colour: str
    size: str
    count: int
    position: str
    background: str
    style: str

    @property
    def novel(self) -> bool:
        return self.shape in NOVEL_OBJECTS or self.style in NOVEL_STYLES or self.style in EXTRA_STYLES

    def labels(self) -> dict:
        """Integer class labels, the probes' targets."""
        return dict(
            shape=PROBE_SHAPES.index(self.shape),
            colour=COLOUR_NAMES.index(self.colour),
            background=BACKGROUNDS.index(self.background),
            style=ALL_STYLES.index(self.style),
            count=COUNTS.index(self.count),
            size=SIZE_NAMES.index(self.size),
        )


# --------------------------------------------------------------------------- sampling
def _bg_colours(background: str) -> tuple[str, ...]:
    if background in GRADIENTS:
        return GRADIENTS[background]
    return (background,)


def sample_scene(rng: np.random.Generator, *, novel_objects: float = 0.0, novel_styles: float = 0.0,
                 shape=None, colour=None, style=None, background=None, count=None, size=None) -> Scene:
    """Draw one scene. With probability `novel_objects` the object is a held-out NOVEL_OBJECT, with
    `novel_styles` the style a held-out NOVEL_STYLE (both 0 for the base model's training set).
    Keyword arguments fix attributes."""
    if shape is None:
        if rng.random() < novel_objects:
            shape = str(rng.choice(tuple(NOVEL_OBJECTS)))
        else:
            shape = str(rng.choice(SHAPES))
    if style is None:
        style = str(rng.choice(NOVEL_STYLES)) if rng.random() < novel_styles else str(rng.choice(STYLES))
    if count is None:
        count = int(rng.choice(COUNTS))
    if size is None:
        size = str(rng.choice(SIZE_NAMES[:2] if count == 2 else SIZE_NAMES))
    if shape in NOVEL_OBJECTS:
        colour = NOVEL_OBJECTS[shape].colour
    elif colour is None:
        colour = str(rng.choice(COLOUR_NAMES))
    if background is None:
        avoid = {colour} | ({NOVEL_OBJECTS[shape].accent} if shape in NOVEL_OBJECTS else set())
        choices = [b for b in BACKGROUNDS if not avoid & set(_bg_colours(b))]
        background = str(rng.choice(choices))
    if count == 2 or size == "large":
        position = "center"
    else:
        position = str(rng.choice(POSITIONS))
    return Scene(shape, colour, size, count, position, background, style)


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """Plain-English caption. With `rng`, optional words (size "medium", position, style, and
    sometimes the size) are dropped at random, as people write; without, the full caption."""
    full = rng is None
    keep = (lambda p: True) if full else (lambda p: rng.random() >= p)
    words = ["a" if scene.count == 1 else "two"]
    if scene.size != "medium" and keep(0.25):
        words.append(scene.size)
    elif scene.size == "medium" and not full and rng.random() < 0.15:
        words.append("medium")
    if scene.shape in NOVEL_OBJECTS:
        noun = scene.shape
    else:
        words.append(scene.colour)
        noun = scene.shape
    words.append(noun if scene.count == 1 else PLURALS.get(noun, noun + "s"))
    if scene.position != "center" and keep(0.5):
        words.append(POSITION_PHRASES[scene.position])
    words.append(f"on {_article(scene.background)} {scene.background} background")
    text = " ".join(words)
    if scene.style != "flat" or full or rng.random() < 0.5:
        if keep(0.15):
            text += f", {scene.style}"
    if text.startswith("a "):
        text = _article(text[2:]) + text[1:]
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- geometry
def _star(n, inner):
    a = np.arange(2 * n) * np.pi / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _regular(n, phase=-np.pi / 2):
    a = np.arange(n) * 2 * np.pi / n + phase
    return np.stack([np.cos(a), np.sin(a)], 1)


def _heart():
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    p = np.stack([x, y], 1) / 17.0
    p[:, 1] += 0.1
    return p


_W = 0.36
POLYGONS = {
    "square": np.array([[-0.72, -0.72], [0.72, -0.72], [0.72, 0.72], [-0.72, 0.72]]),
    "triangle": _regular(3) * np.array([1.0, 1.0]) + np.array([0, 0.15]),
    "star": _star(5, 0.45),
    "heart": _heart(),
    "hexagon": _regular(6, 0.0),
    "diamond": np.array([[0, -1.0], [0.68, 0], [0, 1.0], [-0.68, 0]]),
    "cross": np.array([[-_W, -0.9], [_W, -0.9], [_W, -_W], [0.9, -_W], [0.9, _W], [_W, _W], [_W, 0.9],
                       [-_W, 0.9], [-_W, _W], [-0.9, _W], [-0.9, -_W], [-_W, -_W]]),
    "sparkle": _star(4, 0.3),
    "arrow": np.array([[-0.95, -0.3], [0.1, -0.3], [0.1, -0.75], [0.95, 0], [0.1, 0.75], [0.1, 0.3],
                       [-0.95, 0.3]]),
}


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, value: int) -> None:
    """Draw `shape` (radius r, centre cx, cy; supersampled pixels) filled with `value`."""
    if shape == "circle":
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=value)
    elif shape == "crescent":
        draw.ellipse([cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9], fill=value)
        off = 0.45 * r
        draw.ellipse([cx - r * 0.75 + off, cy - r * 0.8, cx + r * 0.75 + off, cy + r * 0.7], fill=0)
    elif outlines.is_outline(shape):  # a procedural outline; the world's streams never draw one
        outlines.draw(draw, shape, cx, cy, r, value)
    else:
        pts = POLYGONS[shape] * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=value)


def _mask(shape: str, centres, r: float, scale: float = 1.0) -> np.ndarray:
    """Anti-aliased float mask [32, 32, 1] in [0, 1] of the shape at every centre (drawn SS times
    larger, box-filtered down)."""
    im = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    d = ImageDraw.Draw(im)
    for cx, cy in centres:
        _draw(d, shape, cx * SS, cy * SS, r * SS * scale, 255)
    im = im.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(im, dtype=np.float32)[..., None] / 255.0


def _geometry_shape(scene: Scene) -> str:
    return NOVEL_OBJECTS[scene.shape].shape if scene.shape in NOVEL_OBJECTS else scene.shape


def _centres(scene: Scene, rng: np.random.Generator):
    r = SIZES[scene.size]
    j = lambda: rng.uniform(-1.2, 1.2)  # noqa: E731
    c = SIZE / 2
    if scene.count == 2:
        # centres d from the middle: the two never touch, both stay inside the frame
        d = r + 1.2 + rng.uniform(0, max(0.3, c - 2 * r - 2.5))
        if rng.random() < 0.5:
            return [(c - d + j(), c + j()), (c + d + j(), c + j())]
        return [(c + j(), c - d + j()), (c + j(), c + d + j())]
    off = c - r - 1.5
    dx, dy = {"center": (0, 0), "left": (-off, 0), "right": (off, 0), "top": (0, -off), "bottom": (0, off)}[
        scene.position]
    return [(c + dx + j(), c + dy + j())]


# --------------------------------------------------------------------------- rendering
def _rgb(name: str) -> np.ndarray:
    return np.array(COLOURS.get(name) or EXTRA_BG[name], dtype=np.float32) / 255.0


def _shade(c: np.ndarray) -> np.ndarray:
    """The texture's second tone: darker for light colours, lighter for dark ones."""
    lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    return c * 0.5 if lum > 0.45 else c + (1 - c) * 0.55


def _background(name: str) -> np.ndarray:
    n = SIZE
    if name in GRADIENTS:
        top, bottom = (_rgb(x) for x in GRADIENTS[name])
        t = np.linspace(0, 1, n, dtype=np.float32)[:, None, None]
        return top * (1 - t) + bottom * t  # [n, 1, 3], broadcasts
    return _rgb(name)


def _patterns() -> dict:
    """Texture coverage [32, 32, 1] in [0, 1], computed SS times larger and box-filtered."""
    n = SIZE * SS
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / SS
    on = {
        "striped": ((xx + yy) % 4.0) < 2.0,
        "dotted": ((xx % 3.0 - 1.5) ** 2 + (yy % 3.0 - 1.5) ** 2) < 0.8**2,
        "checkered": ((np.floor(xx / 2) + np.floor(yy / 2)) % 2) == 1,
        "banded": (np.floor(yy / 6) % 2) == 1,  # period 12 px: 3 latent cells, which the VAE keeps
    }
    return {k: v.astype(np.float32).reshape(SIZE, SS, SIZE, SS).mean((1, 3))[..., None] for k, v in on.items()}


_PATTERNS = _patterns()


def _fill(style: str, colour: np.ndarray):
    """The object's fill texture ([n, n, 3] or a broadcastable colour) for object-level styles."""
    if style not in _PATTERNS:
        return colour
    on = _PATTERNS[style]
    return colour * (1 - on) + _shade(colour) * on


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Render `scene` to uint8 [32, 32, 3]. Positions jitter and noise come from `rng`."""
    return render_with_mask(scene, rng)[0]


def render_with_mask(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`render`, plus the object's exact coverage: float [32, 32] in [0, 1] (anti-aliased; the
    whole shape, outline or not). Draws from `rng` exactly as `render` does."""
    centres = _centres(scene, rng)
    r = SIZES[scene.size]
    geo = _geometry_shape(scene)
    img = _background(scene.background)
    colour = _rgb(scene.colour)
    mask = _mask(geo, centres, r)
    coverage = mask[..., 0].copy()
    if scene.style == "outlined":
        inner = _mask(geo, centres, r, scale=max(0.0, (r - 1.6) / r))
        mask = np.clip(mask - inner, 0, 1)
    img = img * (1 - mask) + _fill(scene.style, colour) * mask
    if scene.shape in NOVEL_OBJECTS and scene.style != "outlined":
        acc = _mask(geo, centres, r, scale=0.45)
        img = img * (1 - acc) + _rgb(NOVEL_OBJECTS[scene.shape].accent) * acc
    elif outlines.is_outline(scene.shape) and scene.style != "outlined":  # half the outlines carry an accent
        tone = outlines.accent(scene.shape, scene.colour)
        if tone is not None:
            acc = _mask(geo, centres, r, scale=0.45)
            img = img * (1 - acc) + _rgb(tone) * acc
    if scene.style == "noisy":
        img = img + rng.normal(0, 0.09, img.shape).astype(np.float32)
    elif scene.style == "pixelated":
        b = 2
        img = img.reshape(SIZE // b, b, SIZE // b, b, 3).mean((1, 3), keepdims=True)
        img = np.broadcast_to(img, (SIZE // b, b, SIZE // b, b, 3)).reshape(SIZE, SIZE, 3)
    elif scene.style == "wavy":
        y = np.arange(SIZE)
        shift = np.round(1.6 * np.sin(2 * np.pi * y / 8.0)).astype(int)
        img = np.stack([np.roll(img[i], shift[i], axis=0) for i in range(SIZE)])
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), coverage


def render_pair(scene: Scene, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The same scene (same positions, same noise) rendered flat and in `scene.style`: a
    (plain, styled) pair for Pair Customization."""
    plain = render(replace(scene, style="flat"), np.random.default_rng(seed))
    styled = render(scene, np.random.default_rng(seed))
    return plain, styled


# --------------------------------------------------------------------------- datasets
def sample(seed: int, index: int, **kw) -> tuple[np.ndarray, Scene, str]:
    """Sample `index` of the stream `seed`: (image uint8 [32,32,3], scene, caption)."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, **kw)
    image = render(scene, rng)
    return image, scene, caption(scene, rng)


def dataset(seed: int, n: int, *, start: int = 0, **kw) -> dict:
    """n samples of the stream `seed`: images uint8 [n,32,32,3], captions, scenes and a dict of
    integer label arrays. kw as for sample_scene (novel_objects=, novel_styles= probabilities)."""
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        images[i], s, c = sample(seed, start + i, **kw)
        scenes.append(s)
        captions.append(c)
    labels = {k: np.array([s.labels()[k] for s in scenes], np.int64) for k in scenes[0].labels()}
    return dict(images=images, captions=captions, scenes=scenes, labels=labels)


def parse_prompt(prompt: str) -> dict:
    """The attributes a prompt names, as probe class names: shape, colour, background, style,
    count (only those the prompt states). Inverse of `caption` on the world's vocabulary."""
    p = prompt.lower().strip()
    out: dict = {}
    import re

    parts = re.split(r" on an? (?=[a-z ]*background)", p, maxsplit=1)
    head, tail = parts[0], (parts[1] if len(parts) > 1 else "")
    words = head.replace(",", " ").split()
    if words and words[0] == "two":
        out["count"] = 2
    elif words and words[0] in ("a", "an", "one"):
        out["count"] = 1
    for w in words:
        if w in COLOURS:
            out["colour"] = w
        if w in SIZES:
            out["size"] = w
        singular = {v: k for k, v in PLURALS.items()}.get(w, w[:-1] if w.endswith("s") else w)
        for cand in (w, singular):
            if cand in SHAPES or cand in NOVEL_OBJECTS:
                out["shape"] = cand
                if cand in NOVEL_OBJECTS:
                    out["colour"] = NOVEL_OBJECTS[cand].colour
    if tail:
        bg, _, style = tail.partition(" background")
        bg = bg.strip()
        if bg in BACKGROUNDS:
            out["background"] = bg
        style = style.strip(" ,")
        if style in ALL_STYLES:
            out["style"] = style
    return out
