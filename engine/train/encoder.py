"""The encoder adapter trained on the miniature world: Taming Encoder's recipe (Jia et al. 2023)
on IP-Adapter's base layout, through the one training loop (core.py).

Trained (fp32 master weights, initialised as IP-Adapter's tutorial_train.py does,
`encoder.initial_weights`): the image projection (Linear E -> T·D, LayerNorm D) and every attn2
layer's decoupled W'_K, W'_V [h, D]. Frozen: the UNet, text encoder, VAE and the image encoder
(a CLIPVisionModelWithProjection folder: `image_encoder=`, by default the model folder's
image_encoder/; the shipped tiny adapter uses engine/tiny/model/ip_adapter/image_encoder/, the tower
trained to carry shape, docs/tiny.md). An encoder other than the base model's own is copied beside
the output file (`<output>/image_encoder/`), where registration looks for it first.

Semantics of one step (batch `step` of `training_batch(seed, step, B)`):

    x0_b   a seen-world scene (never a held-out object), its caption ("" for 10 % of rows; for
           35 % the object named only by its category word, for 15 % not at all, colour dropped:
           `coarse_caption`, so the reference must decide what the caption leaves open)
    ref_b  ANOTHER render of the same object (size, position, background drawn again), its
           background masked to gray    [cross-reference regularization; off: the target itself]
    e_b    = image_embeds(ref_b), or 0 for 10 % of rows [object-embedding dropping; the zero
           embedding is the base variant's unconditional branch, as serving plans it]
    c_b    = LayerNorm(reshape(proj(e_b), [T, D]))             (encoder.project: the serving math)
           [Plus variant: e_b = hidden_states[-2](ref_b) (a zero image's when dropped), c_b = the
           Resampler of e_b, T = 16]
    K'_l, V'_l = c_b W'_K,lᵀ, c_b W'_V,lᵀ per attn2 layer l     (encoder.image_kv)
    pred   = UNet(x_t, t) with Z_l = softmax(QKᵀ/√d)V + 1·softmax(QK'ᵀ/√d)V'  (attention.image_attention,
             K'/V' held in the BatchState like the planned text K/V)
    loss   = the loop's ε (or v) MSE, mask 1

The result is one IP-Adapter base- (or Plus-) layout file (`ip_adapter.safetensors`: image_proj.*,
ip_adapter.<id>.to_{k,v}_ip.weight) that `engine.adapters.register` and diffusers'
`load_ip_adapter` read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..adapters import encoder as encoder_format
from ..adapters.families import encoder as encoder_family
from ..tiny import outlines, references, world
from .core import Batch, Example, Method, Trainer, train
from .custom_diffusion import resolve_engine
from .data import TrainInputError

WEIGHTS_NAME = "ip_adapter.safetensors"
DROP_RATES = (references.DROP_IMAGE, references.DROP_TEXT, references.DROP_BOTH)

# Taming Encoder's captions name the category and leave the instance to the image. The world's
# captions name the exact shape and colour, so an adapter trained on them alone learns that the
# image is redundant and stays out of the way (docs/training.md, "The encoder adapter"). For a
# share of rows the caption therefore names the object only by a coarse word (the category of its
# geometry, colour dropped) or not at all, so the reference alone decides shape and colour. The
# categories are the held-out objects' class words (world.NOVEL_OBJECTS' supercategory: star,
# circle, triangle) plus "square", so training poses the same question as a zero-shot prompt:
# "a star ..." with a reference of something else star-like.
CATEGORY = {"circle": "circle", "hexagon": "circle", "heart": "circle", "triangle": "triangle",
            "diamond": "triangle", "star": "star", "cross": "star", "square": "square"}
COARSE_RATES = (0.35, 0.15)  # per row: (category word, no object word); the rest keep the full caption


# Orientations of a seen shape's silhouette (np.rot90 on the image's (row, column) axes, or a flip
# top to bottom): the world draws every shape upright, so an adapter trained on it alone meets 8
# silhouettes and learns to pick among them (a held-out four-point star comes out as a cross). An
# upside-down heart or a sideways triangle is still a seen shape, but a new outline the reference
# must carry. Applied to the target and its reference alike, only where nothing else in the
# picture would turn (plain backgrounds: a gradient runs top to bottom; not "striped": its
# diagonal stripes would mirror), and only where the outline changes (a square, circle or cross
# is its own rotation). The position word turns with the picture.
ORIENTATIONS = ("rot90", "rot270", "flip")
ORIENTATION_POSITIONS = {  # where an object at each position ends up
    "rot90": {"top": "left", "left": "bottom", "bottom": "right", "right": "top", "center": "center"},
    "rot270": {"top": "right", "right": "bottom", "bottom": "left", "left": "top", "center": "center"},
    "flip": {"top": "bottom", "bottom": "top", "left": "left", "right": "right", "center": "center"},
}
TURNS = {"triangle": ORIENTATIONS, "heart": ORIENTATIONS, "star": ORIENTATIONS,  # the outlines each one changes
         "diamond": ("rot90", "rot270"), "hexagon": ("rot90", "rot270")}


def orient(image: np.ndarray, orientation: str, axes: tuple = (0, 1)) -> np.ndarray:
    """Semantics: `image` turned as ORIENTATIONS names it on its (row, column) `axes`:
    "rot90" np.rot90 k=1 (counter-clockwise), "rot270" k=3, "flip" rows reversed; a copy."""
    if orientation == "flip":
        return np.ascontiguousarray(np.flip(image, axis=axes[0]))
    if orientation in ("rot90", "rot270"):
        return np.ascontiguousarray(np.rot90(image, k=1 if orientation == "rot90" else 3, axes=axes))
    raise ValueError(f"orientation: expected one of {ORIENTATIONS}, got {orientation!r}")


def orientations(seed: int, step: int, scenes, share: float) -> list:
    """Semantics: per scene of batch `step`, an orientation of TURNS[shape] (uniform) with
    probability `share` where the scene can turn (a plain background, not striped), else None;
    a pure function of (seed, step)."""
    if not 0 <= share <= 1:
        raise ValueError(f"orientations: expected a share in [0, 1], got {share!r}")
    rng = np.random.default_rng([seed, step, 3])
    u, pick = rng.random(len(scenes)), rng.random(len(scenes))
    out = []
    for s, x, y in zip(scenes, u, pick):
        turns = TURNS.get(s.shape, ())
        ok = turns and s.background not in world.GRADIENTS and s.style != "striped" and x < share
        out.append(turns[int(y * len(turns))] if ok else None)
    return out


def orient_caption(caption: str, scene: world.Scene, orientation) -> str:
    """The caption of `scene` turned by `orientation`: its position phrase, if it names one, moved."""
    if orientation is None or scene.position == "center":
        return caption
    old = world.POSITION_PHRASES[scene.position]
    new = world.POSITION_PHRASES[ORIENTATION_POSITIONS[orientation][scene.position]]
    return caption.replace(old, new, 1)


def _plural(noun: str) -> str:
    return world.PLURALS.get(noun, noun + "s")


def swap_object(caption: str, phrase: str, new: str) -> str:
    """Semantics: `caption` with its first `phrase` (" red star ") replaced by `new` (" star ",
    " "), the leading article re-chosen for the word that now follows it ("a on ..." stays "a")."""
    text = caption.replace(phrase, new, 1)
    head, _, rest = text.partition(" ")
    if head in ("a", "an"):
        text = f"{world._article(rest)} {rest}" if not rest.startswith("on ") else f"a {rest}"
    return text


def coarse_caption(caption: str, scene: world.Scene, mode: str) -> str:
    """Semantics: the world's `caption` of `scene` with its object phrase ("red star", "red
    stars") replaced: mode "category" -> the category word of CATEGORY ("star", "stars"), colour
    dropped; "none" -> no colour and no object word ("a on a blue background"); "full" ->
    unchanged. Size, position, background and style words stay as the caption had them; the
    leading article is re-chosen for the word that now follows it."""
    if mode == "full" or not caption:
        return caption
    if scene.shape not in CATEGORY:
        raise ValueError(f"coarse_caption: {scene.shape!r} is not a seen shape {tuple(CATEGORY)}")
    noun = scene.shape if scene.count == 1 else _plural(scene.shape)
    phrase = f" {scene.colour} {noun} "
    if phrase not in caption:
        raise ValueError(f"coarse_caption: {phrase.strip()!r} not in the caption {caption!r}")
    if mode == "category":
        word = CATEGORY[scene.shape]
        new = f" {word if scene.count == 1 else _plural(word)} "
    elif mode == "none":
        new = " "
    else:
        raise ValueError(f"coarse_caption: mode {mode!r} is not 'full', 'category' or 'none'")
    return swap_object(caption, phrase, new)


def outline_caption(caption: str, scene: world.Scene, mode: str) -> str:
    """Semantics: the caption of a procedural-outline scene (its world caption names the shape
    "outline-<seed>") with the object phrase replaced by the category word of the outline's nearest
    seen shape (CATEGORY[outlines.outline(seed)["nearest"]], the IoU rule of outlines.nearest_seen):
    mode "full" -> "<colour> <word>", "category" -> "<word>" (colour dropped), "none" -> no colour
    and no object word, as coarse_caption does for a seen shape. "" stays ""."""
    if not caption:
        return caption
    word = CATEGORY[outlines.outline(outlines.seed_of(scene.shape))["nearest"]]
    noun = scene.shape if scene.count == 1 else _plural(scene.shape)
    phrase = f" {scene.colour} {noun} "
    if phrase not in caption:
        raise ValueError(f"outline_caption: {phrase.strip()!r} not in the caption {caption!r}")
    noun_word = word if scene.count == 1 else _plural(word)
    new = {"full": f" {scene.colour} {noun_word} ", "category": f" {noun_word} ", "none": " "}.get(mode)
    if new is None:
        raise ValueError(f"outline_caption: mode {mode!r} is not 'full', 'category' or 'none'")
    return swap_object(caption, phrase, new)


def procedural_rows(seed: int, step: int, batch_size: int, share: float) -> np.ndarray:
    """Semantics: bool [B]: which rows of batch `step` are a procedural outline (each with
    probability `share`), a pure function of (seed, step)."""
    if not 0 <= share <= 1:
        raise ValueError(f"procedural: expected a share in [0, 1], got {share!r}")
    return np.random.default_rng([seed, step, 4]).random(batch_size) < share


def coarse_modes(seed: int, step: int, batch_size: int, rates: tuple = COARSE_RATES) -> list[str]:
    """Semantics: B modes for batch `step` of stream `seed` ("category" with probability rates[0],
    "none" with rates[1], else "full"), a pure function of (seed, step) like the batch itself."""
    category, none = rates
    if not (0 <= category and 0 <= none and category + none <= 1):
        raise ValueError(f"coarse rates: expected two shares summing to at most 1, got {rates!r}")
    u = np.random.default_rng([seed, step, 2]).random(batch_size)
    return ["category" if x < category else "none" if x < category + none else "full" for x in u]


class EncoderAdapter(Method):
    """The trainable projection (base) or Resampler (Plus) + K'/V' of an IP-Adapter adapter (module docstring)."""

    name = "encoder"
    aug = False  # the world's own renders vary position, size and background

    def __init__(self, engine, *, tokens: int = 4, seed: int = 0, image_encoder: str | None = None,
                 variant: str = encoder_format.BASE, depth: int = 2, heads: int = 1):
        store = engine.adapters
        folder = image_encoder or os.path.join(store.model_dir or "", "image_encoder")
        if not os.path.isdir(folder):
            raise TrainInputError(f"image_encoder: {folder!r} is not a folder (the base model has no image_encoder/; "
                                  f"pass a local CLIPVisionModelWithProjection folder)")
        self.folder = os.path.realpath(folder)
        self.model, self.processor = encoder_family.image_encoder(store, self.folder)
        self.embed_dim = self.model.config.projection_dim
        if variant == encoder_format.BASE:
            proj, ip = encoder_format.initial_weights(engine.base.unet, self.embed_dim, tokens=tokens, seed=seed)
        elif variant == encoder_format.PLUS:  # the Resampler reads every token of hidden_states[-2]
            proj, ip = encoder_format.initial_plus_weights(engine.base.unet, self.model.config.hidden_size,
                                                           tokens=tokens, depth=depth, heads=heads, seed=seed)
        else:
            raise TrainInputError(f"variant: expected {encoder_format.BASE!r} or {encoder_format.PLUS!r}, got {variant!r}")
        self.variant, self.depth, self.heads = variant, depth, heads
        device = next(engine.base.unet.parameters()).device
        as_param = lambda t: torch.nn.Parameter(t.to(device=device, dtype=torch.float32))  # noqa: E731
        self.proj = {k: as_param(v) for k, v in proj.items()}
        self.ip = {k: as_param(v) for k, v in ip.items()}
        self.ids = encoder_format.layer_ids(engine.base.unet)
        self.tokens, self.dtype = tokens, engine.dtype
        self.features: torch.Tensor | None = None  # [R, E] image_embeds of the next forward's rows

    def parameters(self):
        return {**{f"image_proj.{k}": p for k, p in self.proj.items()},
                **{f"ip_adapter.{k}": p for k, p in self.ip.items()}}

    def file(self) -> encoder_format.EncoderFile:
        """The adapter as the serving path holds it, its tensors the trained Parameters."""
        layers = {name: (self.ip[f"{i}.to_k_ip.weight"], self.ip[f"{i}.to_v_ip.weight"]) for name, i in self.ids.items()}
        heads, depth = (self.heads, self.depth) if self.variant == encoder_format.PLUS else (0, 0)
        return encoder_format.EncoderFile("", self.variant, self.tokens, heads, depth, self.proj, layers, self.folder)

    @torch.no_grad()
    def embed(self, images, drop: np.ndarray) -> torch.Tensor:
        """Semantics: base: Shape [N, E]: row i = image_embeds(images[i]) (the frozen encoder, the
        serving path's processor), or zeros where drop[i] (the dropped object embedding).
        plus: Shape [N, P, E']: hidden_states[-2] of images[i], or of a zero image where drop[i]
        (the Plus variant's unconditional input, as serving plans it)."""
        param = next(self.model.parameters())
        px = encoder_format.pixels(self.processor, [Image.fromarray(np.asarray(im)) for im in images])
        px = px.to(device=param.device, dtype=param.dtype)
        keep = torch.from_numpy(~np.asarray(drop, bool)).to(param.device)
        if self.variant == encoder_format.PLUS:
            px = px * keep[:, None, None, None]
            return self.model(pixel_values=px, output_hidden_states=True).hidden_states[-2].float()
        return self.model(pixel_values=px).image_embeds.float() * keep[:, None]

    def hooks(self, engine):
        @contextlib.contextmanager
        def held():
            f = self.file()
            tokens = encoder_format.project(f, self.features)  # [R, T, D], differentiable
            kv = {name: tuple(x.to(self.dtype) for x in encoder_format.image_kv(tokens, W_k, W_v))
                  for name, (W_k, W_v) in f.layers.items()}
            engine.state.hold_images(kv, torch.ones(tokens.shape[0], device=tokens.device, dtype=self.dtype))
            yield

        return held()

    def write(self, engine, output: str) -> dict:
        path = os.path.join(output, WEIGHTS_NAME)
        encoder_format.save(path, {k: p.detach().float() for k, p in self.proj.items()},
                            {k: p.detach().float() for k, p in self.ip.items()})
        files = {"weights": path}
        base_encoder = os.path.join(engine.adapters.model_dir or "", "image_encoder")
        if not os.path.isdir(base_encoder) or not os.path.samefile(base_encoder, self.folder):
            # trained on another image encoder than the base model's: ship it beside the file,
            # where registration (and diffusers' load_ip_adapter) looks first
            files["image_encoder"] = copy_image_encoder(self.folder, os.path.join(output, "image_encoder"))
        return files


def copy_image_encoder(folder: str, out: str) -> str:
    """Copy an image-encoder folder's config.json, model.safetensors and preprocessor_config.json
    (if any) to `out`, replacing what was there; returns `out`."""
    if os.path.realpath(folder) == os.path.realpath(out):
        return out
    os.makedirs(out, exist_ok=True)
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    return out


def training_batch(seed: int, step: int, batch_size: int, *, cross_reference: bool = True,
                   drop_rates: tuple = DROP_RATES, coarse_rates: tuple = COARSE_RATES, turn: float = 0.0,
                   procedural: float = 0.0) -> dict:
    """references.training_batch with the captions coarsened per `coarse_modes` (a dropped
    caption stays ""); adds "modes": the B caption modes. turn > 0: that share of the rows that can
    turn has its target and reference turned alike (`orientations`, ORIENTATIONS) and its
    position phrase moved; "orientations": the B orientations (None: upright). turn=0 is the
    stream without it, bit for bit. procedural > 0: that share of the rows (`procedural_rows`)
    replaced by a procedural outline (references.outline_pair: target, reference of the same
    outline, caption by `outline_caption`; the row's dropping and caption mode kept);
    "procedural": the B flags. procedural=0 is the stream without it, bit for bit."""
    b = references.training_batch(seed, step, batch_size, cross_reference=cross_reference, drop_rates=drop_rates)
    flags = procedural_rows(seed, step, batch_size, procedural) if procedural else np.zeros(batch_size, bool)
    for i in np.flatnonzero(flags):
        pair = references.outline_pair(seed, step, int(i), same_render=not cross_reference)
        b["targets"][i] = pair.target.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1
        b["references"][i], b["scenes"][i] = pair.reference, pair.scene
        b["captions"][i] = pair.caption if b["captions"][i] else ""  # a dropped text stays dropped
    modes = coarse_modes(seed, step, batch_size, coarse_rates)
    turns = orientations(seed, step, b["scenes"], turn) if turn else [None] * batch_size
    b["captions"] = [(outline_caption if f else coarse_caption)(orient_caption(c, s, o), s, m)
                     for c, s, m, o, f in zip(b["captions"], b["scenes"], modes, turns, flags)]
    for i, o in enumerate(turns):
        if o is not None:
            b["targets"][i] = orient(b["targets"][i], o, axes=(1, 2))  # [3, H, W]
            b["references"][i] = orient(b["references"][i], o)  # [H, W, 3]
    b["modes"], b["orientations"], b["procedural"] = modes, turns, [bool(f) for f in flags]
    return b


@dataclass
class EncoderBatch(Batch):
    features: torch.Tensor | None = None  # [R, E]: each row's (possibly dropped) object embedding


class EncoderTrainer(Trainer):
    """The loop's Trainer on the seen world's stream (references.training_batch) instead of a
    concept's images: batch `step` is a pure function of (seed, step), so resume is exact."""

    def __init__(self, engine, method: EncoderAdapter, *, seed: int, cross_reference: bool = True,
                 drop_rates: tuple = DROP_RATES, coarse_rates: tuple = COARSE_RATES, turn: float = 0.0,
                 procedural: float = 0.0, **kw):
        # the stream replaces the instance list; one stand-in Example satisfies the loop's check
        super().__init__(engine, method, [Example(None, "")], seed=seed, aug=False, **kw)
        self.seed, self.cross_reference, self.drop_rates = seed, cross_reference, tuple(drop_rates)
        self.coarse_rates, self.turn, self.procedural = tuple(coarse_rates), float(turn), float(procedural)
        coarse_modes(seed, 0, 1, self.coarse_rates)  # bad rates fail here, not at step 1
        orientations(seed, 0, [], self.turn)
        procedural_rows(seed, 0, 0, self.procedural)

    def make_batch(self) -> EncoderBatch:
        b = training_batch(self.seed, self.step, self.batch_size, cross_reference=self.cross_reference,
                           drop_rates=self.drop_rates, coarse_rates=self.coarse_rates, turn=self.turn,
                           procedural=self.procedural)
        latents, noise, t = self.draw(torch.from_numpy(b["targets"]))
        mask = torch.ones(latents.shape[0], 1, *latents.shape[2:], device=latents.device)
        feats = self.method.embed(b["references"], b["drop_image"])
        return EncoderBatch(list(b["captions"]), latents, noise, t, mask, latents.shape[0], feats)

    def loss(self, batch: EncoderBatch) -> torch.Tensor:
        self.method.features = batch.features
        try:
            return super().loss(batch)
        finally:
            self.method.features = None


def encoder(base, *, steps: int = 1000, lr: float = 1e-3, batch_size: int = 8, tokens: int | None = None, seed: int = 0,
            output=None, cross_reference: bool = True, drop: bool = True, coarse: bool = True, image_encoder: str | None = None,
            max_grad_norm: float = 1.0, weight_decay: float = 1e-2, checkpoint_every: int = 0,
            resume: bool = False, progress: bool = True, device=None, dtype=None, variant: str = encoder_format.BASE,
            turn: float = 0.0, procedural: float = 0.0):
    """Train an encoder adapter (IP-Adapter base layout) on the miniature world's seen objects with
    Taming Encoder's two additions, and write `<output>/ip_adapter.safetensors`.

    cross_reference=False conditions on the target's own render (masked) instead of another render
    of its object (the ablation); drop=False never drops the object embedding or the text (the
    other ablation); coarse=False keeps every caption's exact shape and colour (COARSE_RATES
    otherwise: that share of rows names the object by its category or not at all, so the
    reference decides its shape). turn: the share of the rows that can turn drawn turned
    (ORIENTATIONS: new outlines of the seen shapes; 0 keeps the world's upright stream).
    procedural: the share of rows drawn as a procedural outline (engine/tiny/outlines.py: many
    silhouettes, none near a held-out one; captioned by its nearest seen category; 0 keeps the
    world's 8 shapes, the default and the shipped recipe). The
    world's stream is the seen world of engine/tiny/world.py: the data is
    references.training_batch(seed, step, batch_size). Returns a TrainResult (.files["weights"]).
    """
    if output is None:
        raise TrainInputError("output: a folder to write the adapter to is required")
    if tokens is None:
        tokens = 16 if variant == encoder_format.PLUS else 4  # IP-Adapter's and IP-Adapter Plus's counts
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 < tokens <= encoder_format.MAX_TOKENS_PER_IMAGE:
        raise TrainInputError(f"tokens: expected an integer in 1..{encoder_format.MAX_TOKENS_PER_IMAGE}, got {tokens!r}")
    output = os.fspath(output)
    engine, owned = resolve_engine(base, device, dtype)
    try:
        method = EncoderAdapter(engine, tokens=tokens, seed=seed, image_encoder=image_encoder, variant=variant)
        trainer = EncoderTrainer(engine, method, seed=seed, cross_reference=cross_reference,
                                 drop_rates=DROP_RATES if drop else (0.0, 0.0, 0.0),
                                 coarse_rates=COARSE_RATES if coarse else (0.0, 0.0), turn=turn,
                                 procedural=procedural, steps=steps, lr=lr,
                                 batch_size=batch_size, max_grad_norm=max_grad_norm, weight_decay=weight_decay)
        result = train(trainer, output, checkpoint_every=checkpoint_every, resume=resume, progress=progress)
        return result
    finally:
        if owned:
            engine.close()
