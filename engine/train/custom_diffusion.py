"""Custom Diffusion training (Kumari et al., CVPR 2023; diffusers examples/custom_diffusion).

Trained: W'_K and W'_V of every cross-attention (attn2) layer (plus W'_Q and to_out.0 with
freeze="crossattn") as fp32 full weights, and one embedding row per new placeholder — only
those rows are Parameters, never the whole table. The K/V reach the UNet as the `kv` family's
own plan contribution (adapters/families/kv.py: K = W_K e + ΔW_K e with ΔW = W' - W0), so a
trained adapter is served by exactly the code that computed its gradients.

The official script's known faults, fixed here (docs/training.md):
  * with two or more modifier tokens its gradient-mask loop keeps `!= modifier_token_id[i]` for
    i in range(n - 1), so the LAST token's gradient is zeroed and it never trains
    (huggingface/diffusers#7294): here every placeholder row is its own Parameter;
  * AdamW is given the whole token-embedding table, whose weight decay then shrinks every row:
    here only the new rows are optimized;
  * its token files are named `<token>.bin` while holding safetensors bytes, and its final
    inference loads `<token>.safetensors`, which it never wrote: here `<token>.safetensors`.
Kept from it: K/V of the BOS position detached (its processor's `detach` mask; values equal,
gradients differ), the per-sample masked loss, lr scaled by batch size (×2 with prior
preservation), AdamW (0.9, 0.999, 1e-2, 1e-8), gradient clipping at 1.0, constant lr.
"""

from __future__ import annotations

import contextlib
import os

import torch
from safetensors.torch import save_file

from ..adapters import kv as kv_format
from ..adapters.families import FAMILIES, Use
from ..api import AdapterInfo
from ..plan import PLACEHOLDER
from .core import Example, Method, Trainer, files_nbytes, train
from .data import TrainInputError, load_images, load_masks, square, square_mask

WEIGHTS_NAME = "pytorch_custom_diffusion_weights.safetensors"
COMPRESSED_NAME = os.path.join("compressed", "adapter.kv.safetensors")  # a subfolder: beside the
# diffusers weights, every other .safetensors is read as a token file
FREEZE = ("crossattn_kv", "crossattn")
DEFAULT_TEMPLATE = "a {placeholder} {class_word}"


class CustomDiffusion(Method):
    """The method: trained K/V (and Q/out) of every attn2, and the placeholders' rows."""

    name = "custom_diffusion"

    def __init__(self, engine, placeholders: dict[str, torch.Tensor], *, freeze: str = "crossattn_kv",
                 train_kv: bool = True):
        """placeholders: placeholder -> its initial embedding row [D_emb]. train_kv=False trains
        only the rows (textual inversion through the same loop)."""
        if freeze not in FREEZE:
            raise TrainInputError(f"freeze: {freeze!r}, expected one of {FREEZE}")
        self.freeze, self.train_kv = freeze, train_kv
        self.base_kv = kv_format.base_kv_weights(engine.base.unet)
        self.tokens = {p: torch.nn.Parameter(e.detach().float().clone()) for p, e in placeholders.items()}
        self.k, self.v, self.q, self.out = {}, {}, {}, {}
        if train_kv:
            for name, (wk, wv) in self.base_kv.items():
                self.k[name] = torch.nn.Parameter(wk.detach().float().clone())
                self.v[name] = torch.nn.Parameter(wv.detach().float().clone())
        if train_kv and freeze == "crossattn":
            for name, attn in engine.attn2.items():
                self.q[name] = torch.nn.Parameter(attn.to_q.weight.detach().float().clone())
                lin = attn.to_out[0]
                self.out[name] = (torch.nn.Parameter(lin.weight.detach().float().clone()),
                                  torch.nn.Parameter(lin.bias.detach().float().clone()))
        self._family = FAMILIES["kv"]
        self._info = AdapterInfo(name="<training>", path="<training>", family="kv", format="diffusers", rank=0,
                                 targets=tuple(self.k), nbytes=0, token=next(iter(self.tokens), None),
                                 token_map=tuple((p, p) for p in self.tokens))

    def parameters(self):
        out = {f"token.{p}": t for p, t in self.tokens.items()}
        for name in self.k:
            out[f"{name}.to_k"] = self.k[name]
            out[f"{name}.to_v"] = self.v[name]
        for name in self.q:
            out[f"{name}.to_q"] = self.q[name]
            out[f"{name}.to_out.weight"], out[f"{name}.to_out.bias"] = self.out[name]
        return out

    def kv_file(self, dtype) -> kv_format.KvFile:
        """The adapter as the kv family reads it: ΔW = W' - W0 (differentiable in W')."""
        layers = {n: kv_format.KvLayer(dk=(self.k[n] - self.base_kv[n][0].float()).to(dtype),
                                       dv=(self.v[n] - self.base_kv[n][1].float()).to(dtype)) for n in self.k}
        return kv_format.KvFile(path="<training>", format="diffusers", layers=layers, tokens=dict(self.tokens))

    def uses(self):
        dtype = next(iter(self.base_kv.values()))[0].dtype
        return [Use(self._family, self._info.name, 1.0, {}, self._info, self.kv_file(dtype))]

    def adjust_kv(self, layer, k, v):
        # diffusers' CustomDiffusionAttnProcessor: the BOS position's K/V pass values, not gradients
        return torch.cat([k[:, :1].detach(), k[:, 1:]], 1), torch.cat([v[:, :1].detach(), v[:, 1:]], 1)

    @contextlib.contextmanager
    def hooks(self, engine):
        """freeze="crossattn": to_q and to_out.0 of every attn2 compute with W' (y + x·(W' - W0)ᵀ)."""
        handles = []
        for name, attn in engine.attn2.items():
            if name not in self.q:
                continue
            handles.append(attn.to_q.register_forward_hook(_delta_hook(self.q[name], attn.to_q.weight, None, None)))
            w, b = self.out[name]
            lin = attn.to_out[0]
            handles.append(lin.register_forward_hook(_delta_hook(w, lin.weight, b, lin.bias)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def write(self, engine, output):
        """diffusers' layout: `pytorch_custom_diffusion_weights.safetensors` (full fp32 weights,
        keys `<attn2>.processor.to_k_custom_diffusion.weight`, as save_attn_procs writes them) and
        one `<placeholder>.safetensors` = {placeholder: [D_emb]} per token (load_textual_inversion)."""
        files = {}
        # train_kv=False (textual inversion) writes the base's K/V: a folder both readers take
        state = {}
        for name, (wk, wv) in self.base_kv.items():
            pre = f"{name}.processor."
            state[pre + "to_k_custom_diffusion.weight"] = self.k.get(name, wk).detach().float().contiguous()
            state[pre + "to_v_custom_diffusion.weight"] = self.v.get(name, wv).detach().float().contiguous()
            if name in self.q:
                w, b = self.out[name]
                state[pre + "to_q_custom_diffusion.weight"] = self.q[name].detach().float().contiguous()
                state[pre + "to_out_custom_diffusion.0.weight"] = w.detach().float().contiguous()
                state[pre + "to_out_custom_diffusion.0.bias"] = b.detach().float().contiguous()
        files["weights"] = os.path.join(output, WEIGHTS_NAME)
        save_file(state, files["weights"], metadata={"format": "pt"})
        for p, t in self.tokens.items():
            files[p] = os.path.join(output, f"{p}.safetensors")
            save_file({p: t.detach().float().contiguous()}, files[p], metadata={"format": "pt"})
        return files


def _delta_hook(trained, w0, trained_bias, b0):
    def hook(module, args, output):
        x = args[0]
        out = output + x @ (trained - w0.float()).to(x.dtype).t()
        if trained_bias is not None:
            out = out + (trained_bias - b0.float()).to(x.dtype)
        return out

    return hook


# ---------------------------------------------------------------------------- public API
def resolve_engine(base, device=None, dtype=None):
    """`base`: "tiny", a model folder, or an Engine (used as is). Returns (engine, owned)."""
    from ..engine import Engine

    if isinstance(base, Engine):
        return base, False
    if not isinstance(base, (str, os.PathLike)):
        raise TrainInputError(f"base: expected 'tiny', a model folder or an Engine, got {type(base).__name__}")
    return Engine.from_pretrained(os.fspath(base), device=device, dtype=dtype), True


def check_placeholder(engine, placeholder: str, taken=()) -> None:
    """A placeholder the engine can inject: <...> form, one prompt position, not a vocabulary token."""
    import re

    if not isinstance(placeholder, str) or not re.fullmatch(PLACEHOLDER, placeholder):
        raise TrainInputError(f"placeholder: {placeholder!r} is not of the form <name> (no spaces or angle brackets inside)")
    vocab = engine.base.tokenizer.get_vocab()
    if placeholder in vocab or placeholder + "</w>" in vocab:
        raise TrainInputError(f"placeholder: {placeholder!r} is already in the tokenizer's vocabulary; choose a new one")
    if placeholder in taken:
        raise TrainInputError(f"placeholder: {placeholder!r} is used by two concepts")


def token_id(engine, word: str, what: str) -> int:
    """The id of `word`, which must tokenize to exactly one token."""
    if not isinstance(word, str) or not word.strip():
        raise TrainInputError(f"{what}: expected a word, got {word!r}")
    ids = engine.base.tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise TrainInputError(f"{what}: {word!r} is {len(ids)} tokens for this tokenizer, it must be exactly one")
    return ids[0]


def generate_prior(engine, prompts, n: int, *, seed: int, steps: int = 25, guidance: float = 6.0) -> list:
    """n class images for prior preservation, generated by the engine itself.

    prompts: one class prompt (requests of up to max_num_images images at seeds seed, seed + per,
    ...), or a list cycled over the n images (image i from prompts[i % len] at seed + i).
    Returns [(PIL image, its prompt)] * n.

    A list of prompts with varied contexts is the paper's regularization set made offline: its
    captions name backgrounds, counts and styles, so the prior anchors those words' K/V too. A
    bare "a <class word>" names none of them, and on a base whose captions always do (the tiny
    model's) it is out of distribution: there it collapses to one picture (docs/training.md,
    "Prior preservation, explained").
    """
    from ..api import Request

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise TrainInputError(f"class_prompts: expected non-empty strings, got {prompts!r}")
    if len(prompts) == 1:  # requests of up to max_num_images at seeds seed, seed + per, ...
        per = engine.limits["max_num_images"]
        reqs = [Request(prompts[0], num_images=min(per, n - s), seed=seed + s, steps=steps, guidance=guidance)
                for s in range(0, n, per)]
    else:  # one request per image, image i at seed + i
        reqs = [Request(prompts[i % len(prompts)], seed=seed + i, steps=steps, guidance=guidance) for i in range(n)]
    out = []
    for req, r in zip(reqs, engine.generate_batch(reqs)):
        if r.error is not None:
            raise r.error
        out += [(im, req.prompt) for im in r.images]
    return out


def instance_captions(captions, n_images: int, template: str, **fields) -> list[str]:
    """One instance prompt per image, its fields filled in: `captions` (a list of n_images
    strings, each holding {placeholder}) or, when None, `template` for every image. fields: the
    values of {placeholder} and the method's other fields (class_word, super_word)."""
    if captions is None:
        captions = [template] * n_images
    elif isinstance(captions, str) or len(captions) != n_images:
        raise TrainInputError(f"captions: one per image ({n_images}), got "
                              f"{1 if isinstance(captions, str) else len(captions)}")
    out = []
    for cap in captions:
        if not isinstance(cap, str) or "{placeholder}" not in cap:
            raise TrainInputError(f"prompt_template/captions: {cap!r} must contain {{placeholder}}")
        try:
            out.append(cap.format(**fields))
        except (KeyError, IndexError, ValueError) as e:
            raise TrainInputError(f"prompt_template/captions: {cap!r} ({type(e).__name__}: {e}); the fields are "
                                  + ", ".join("{" + k + "}" for k in fields)) from None
    return out


def concept_examples(engine, concepts: list[dict], *, prompt_template, num_prior: int, prior_images, seed: int,
                     init: str | None, captions=None, class_prompts=None):
    """Check every concept and build the examples and initial token rows."""
    size = engine.base.unet.config.sample_size * engine.base.vae_scale_factor
    if not concepts:
        raise TrainInputError("concepts: none given")
    examples, rows, taken = [], {}, set()
    emb = engine.base.text_encoder.get_input_embeddings().weight
    for ci, c in enumerate(concepts):
        unknown = set(c) - {"images", "placeholder", "class_word", "masks", "prompt_template", "prior_images",
                            "captions", "class_prompts"}
        if unknown:
            raise TrainInputError(f"concepts[{ci}]: unknown keys {sorted(unknown)}")
        ph, word = c.get("placeholder", "<new1>"), c.get("class_word")
        check_placeholder(engine, ph, taken)
        taken.add(ph)
        wid = token_id(engine, word, f"concepts[{ci}].class_word" if len(concepts) > 1 else "class_word")
        init_id = wid if init is None else token_id(engine, init, "init_token")
        rows[ph] = emb[init_id]
        images = load_images(c.get("images"), f"concepts[{ci}].images" if len(concepts) > 1 else "images")
        masks = load_masks(c.get("masks"), len(images))
        template = c.get("prompt_template") or prompt_template or DEFAULT_TEMPLATE
        caps = instance_captions(c.get("captions", captions), len(images), template, placeholder=ph, class_word=word)
        for i, im in enumerate(images):
            m = None if masks is None else square_mask(masks[i], size)
            examples.append(Example(square(im, size), caps[i], m))
        priors = c.get("prior_images", prior_images)
        texts = c.get("class_prompts", class_prompts) or ["a {class_word}"]
        texts = [texts] if isinstance(texts, str) else list(texts)
        try:
            texts = [t.format(class_word=word) for t in texts]
        except (AttributeError, KeyError, IndexError, ValueError) as e:
            raise TrainInputError(f"class_prompts: {texts!r} ({type(e).__name__}: {e}); "
                                  "the only field is {class_word}") from None
        if priors is not None:
            # given images: each with the class prompts cycled (one prompt: all the same, the script's)
            priors = [(im, texts[i % len(texts)]) for i, im in enumerate(load_images(priors, "prior_images"))]
        elif num_prior:
            priors = generate_prior(engine, texts, num_prior, seed=seed * 7919 + ci * 104729)
        for im, text in priors or []:
            examples.append(Example(square(im, size), text, prior=True))
    return examples, rows


def custom_diffusion(base, images=None, *, placeholder: str = "<new1>", class_word: str | None = None, masks=None,
                     prompt_template: str | None = None, steps: int = 250, lr: float = 1e-5, scale_lr: bool = True,
                     batch_size: int = 4, prior_images=None, num_prior: int = 0, prior_weight: float = 1.0,
                     freeze: str = "crossattn_kv", seed: int = 0, output=None, compress: bool = False,
                     progress: bool = True, resume: bool = False, concepts=None, checkpoint_every: int = 0,
                     init_token: str | None = None, hflip: bool = False, aug: bool = True,
                     max_grad_norm: float = 1.0, train_kv: bool = True, captions=None, class_prompts=None,
                     device=None, dtype=None):
    """Train a Custom Diffusion adapter through the engine's own path and write it in diffusers'
    layout to `output` (see docs/training.md for every default and its source).

    images: a folder, image paths or PIL images of the concept; class_word: one token (also
    the default initializer of the placeholder's row); concepts: [{"images", "placeholder",
    "class_word"[, "masks"]}, ...] trains several placeholders jointly instead. prior_images or
    num_prior > 0: prior preservation on class images (generated by the engine from "a
    <class_word>" when none are given). lr is the base rate; with scale_lr the rate used is
    lr × batch_size (× 2 with prior preservation). captions: one instance prompt per image
    (each with {placeholder}, optionally {class_word}; e.g. naming the image's own background, so
    the token need not absorb it) instead of prompt_template. class_prompts: the prompts the class
    images are generated from (cycled; {class_word} filled in; default "a {class_word}", the
    script's), e.g. with varied backgrounds, counts and styles to anchor those words. compress=True also writes impasto's
    SVD-compressed `kv` file. train_kv=False trains only the token rows (textual inversion).
    Returns a TrainResult (.path, .losses, .seconds, .files, .nbytes).
    """
    if output is None:
        raise TrainInputError("output: a folder to write the adapter to is required")
    output = os.fspath(output)
    if compress and train_kv and freeze != "crossattn_kv":  # refused before training, not after it
        raise TrainInputError("compress=True: impasto's kv file holds K/V only (freeze='crossattn_kv'); "
                              "a freeze='crossattn' folder is served as written")
    engine, owned = resolve_engine(base, device, dtype)
    try:
        if concepts is None:
            concepts = [{"images": images, "placeholder": placeholder, "class_word": class_word, "masks": masks}]
        elif images is not None:
            raise TrainInputError("give either images= (one concept) or concepts=, not both")
        examples, rows = concept_examples(engine, list(concepts), prompt_template=prompt_template,
                                          num_prior=num_prior, prior_images=prior_images, seed=seed, init=init_token,
                                          captions=captions, class_prompts=class_prompts)
        with_prior = any(e.prior for e in examples)
        rate = lr * batch_size * (2.0 if with_prior else 1.0) if scale_lr else lr
        method = CustomDiffusion(engine, rows, freeze=freeze, train_kv=train_kv)
        trainer = Trainer(engine, method, examples, steps=steps, lr=rate, batch_size=batch_size,
                          prior_weight=prior_weight, seed=seed, max_grad_norm=max_grad_norm, hflip=hflip, aug=aug)
        result = train(trainer, output, checkpoint_every=checkpoint_every, resume=resume, progress=progress)
        if compress and train_kv:
            full = kv_format.read_kv(output, method.base_kv)
            small, _ = kv_format.compress_kv_delta(full)
            result.files["compressed"] = os.path.join(output, COMPRESSED_NAME)
            os.makedirs(os.path.dirname(result.files["compressed"]), exist_ok=True)
            kv_format.write_kv(result.files["compressed"], small)
        result.nbytes = files_nbytes(result.files)
        return result
    finally:
        if owned:
            engine.close()
