"""Perfusion training (Tewel et al., SIGGRAPH 2023, arXiv 2305.01644): key-locked gated rank-1.

Per K and V projection W of every attn2 layer, on every text encoding e (adapters/rank1.py):

    s(e) = i*ᵀ C⁻¹ e / (i*ᵀ C⁻¹ i*),   h(e) = W e − s(e)·W i* + σ((s(e) − β)/τ)·o*

Trained (AdamW, two learning rates): the placeholder's input-embedding row and o*_V of every
attn2 layer; with key_lock=False also o*_K (the ablation the paper argues against).
Fixed: W, C⁻¹, the text encoder, the UNet, and o*_K = W_K i*₀ (the key lock).
i*: starts as i*₀, the encoding of the placeholder's position with its row still the super
word's (= the super word's encoding in the training prompt; with captions=, the mean over the
images' captions, what ChenDarYen's first batch averages), and before every step's forward
becomes ema·i* + (1 − ema)·mean over the instance rows of the placeholder's encoding, without
gradient (ChenDarYen `Perfusion.forward`; methods.md §1.2); with accumulate=k, before every one of
the k micro-batches of an optimizer step, as there. o*_V starts as W_V i*₀.
Loss: ChenDarYen's: mask multiplied into prediction and target, then a plain mean (not
normalized by the mask's area, unlike Custom Diffusion).

The K/V reach the UNet as the `rank1` family's own plan contribution: the in-memory concept is a
`Rank1File` whose o* are these Parameters, applied by `impasto.kernels.rank1_edit` with its
registered autograd inside `build_plan(grad=True)` — the code that serves the written file. So
training edits the positions serving edits: each chunk's BOS and tokens, never its EOS
(EDIT_EOS) or the padding after it (families/rank1.py; the community code edits all 77
positions, with per-position o*).
Defaults and their sources: docs/training.md, "Perfusion".
"""

from __future__ import annotations

import math
import os

import torch

from ..adapters import rank1 as rank1_format
from ..adapters.families import FAMILIES, Use
from ..api import AdapterInfo
from ..errors import AdapterError
from ..prompts import chunk_prompt, encode_prompts
from .core import Example, Method, Trainer, train
from .custom_diffusion import check_placeholder, instance_captions, resolve_engine, token_id
from .data import TrainInputError, load_images, load_masks, square, square_mask

FILE_NAME = "adapter.rank1.safetensors"
DEFAULT_TEMPLATE = "a {placeholder}"  # ChenDarYen's "a photo of a {}"; the tiny world has no "photo of"


class Perfusion(Method):
    """The method: the placeholder's row and o*_V (o*_K too without the key lock); i* by EMA."""

    name = "perfusion"
    aug = False  # the community code has no rescale augmentation (flip only)

    def __init__(self, engine, placeholder: str, super_word: str, prompts: list[str], *, beta: float = 0.75,
                 tau: float = 0.1, ema: float = 0.99, key_lock: bool = True, global_lock: bool = False,
                 lr_embedding: float | None = None, serve_beta: float | None = None, serve_tau: float | None = None,
                 max_norm_ratio: float | None = None):
        """prompts: the instance prompts (they hold `placeholder`; i*₀ is the mean over them);
        serve_beta/serve_tau: the written file's inference defaults (None: rank1's DEFAULT_BETA
        and DEFAULT_TAU); max_norm_ratio: after every optimizer step the placeholder's row is
        scaled back to at most this multiple of the super word's row norm (None: not clamped)."""
        self.placeholder, self.super_word = placeholder, super_word
        self.beta, self.tau, self.ema = float(beta), float(tau), float(ema)
        self.key_lock, self.global_lock, self.lr_embedding = key_lock, global_lock, lr_embedding
        self.serve_beta = rank1_format.DEFAULT_BETA if serve_beta is None else float(serve_beta)
        self.serve_tau = rank1_format.DEFAULT_TAU if serve_tau is None else float(serve_tau)
        base = engine.base
        self.fingerprint = engine.adapters.fingerprint
        self.C_inv = engine.adapters.covariance()
        row = base.text_encoder.get_input_embeddings().weight[token_id(engine, super_word, "super_word")]
        self.token = torch.nn.Parameter(row.detach().float().clone())
        self.max_norm = None if max_norm_ratio is None else float(max_norm_ratio) * float(row.detach().float().norm())
        self.i_star = self.concept_encoding(engine, prompts).double().mean(0).float()  # i*₀
        self.o_k, self.o_v = {}, {}
        with torch.no_grad():
            for name, attn in engine.attn2.items():
                o_k = attn.to_k.weight.detach().float() @ self.i_star  # the key lock: W_K e_super
                self.o_k[name] = torch.nn.Parameter(o_k) if not key_lock else o_k
                self.o_v[name] = torch.nn.Parameter(attn.to_v.weight.detach().float() @ self.i_star)
        self._info = AdapterInfo(name="<training>", path="<training>", family="rank1", format="impasto-rank1",
                                 rank=1, targets=tuple(self.o_v), nbytes=0, token=placeholder,
                                 fingerprint=self.fingerprint, token_map=((placeholder, placeholder),))

    # ------------------------------------------------------------------ Method
    def parameters(self):
        out = {f"token.{self.placeholder}": self.token}
        for name in self.o_v:
            if not self.key_lock:
                out[name + rank1_format.SUFFIX_K] = self.o_k[name]
            out[name + rank1_format.SUFFIX_V] = self.o_v[name]
        return out

    def param_groups(self, params, lr):
        rest = [p for k, p in params.items() if not k.startswith("token.")]
        return [{"params": [self.token], "lr": lr if self.lr_embedding is None else self.lr_embedding},
                {"params": rest}]

    def buffers(self):
        return {"i_star": self.i_star}

    def rank1_file(self, *, beta: float | None = None, tau: float | None = None) -> rank1_format.Rank1File:
        """The concept as the rank1 family reads it (o* are the live tensors: differentiable)."""
        return rank1_format.Rank1File(
            path="<training>", layers={n: (self.o_k[n], self.o_v[n]) for n in self.o_v}, i_star=self.i_star.clone(),
            token_embedding=self.token, placeholder=self.placeholder, super_word=self.super_word,
            beta=self.beta if beta is None else beta, tau=self.tau if tau is None else tau,
            fingerprint=self.fingerprint, format_version=rank1_format.FORMAT_VERSION)

    def uses(self):
        options = {"global_lock": True} if self.global_lock else {}
        return [Use(FAMILIES["rank1"], self._info.name, 1.0, options, self._info, self.rank1_file())]

    @torch.no_grad()
    def concept_encoding(self, engine, texts: list[str]) -> torch.Tensor:
        """The text encoder's output at the placeholder's position in each text, with the
        current row, exactly as the plan encodes it. Returns Shape [n, D] (one per occurrence)."""
        base = engine.base
        rows = encode_prompts(base.tokenizer, base.text_encoder, [(t, 1, 1, False) for t in texts],
                              [{self.placeholder: self.token.detach()}] * len(texts), engine.device)
        out = []
        for text, enc in zip(texts, rows):
            marks = chunk_prompt(base.tokenizer, text, [self.placeholder])[0].marks
            if not marks:
                raise TrainInputError(f"prompt {text!r}: the placeholder {self.placeholder!r} is not in its first 75 tokens")
            out += [enc[pos].float() for pos, _ in marks]
        return torch.stack(out)

    @torch.no_grad()
    def after_step(self):
        # the clamp (off by default; neither community code has one): training grows the row to
        # 3-5x the super word's norm, and CLIP's causal attention lets every later position read
        # it; measured, holding it at 1x does not stop the captioned moon's collapse (docs/training.md)
        if self.max_norm is not None:
            n = float(self.token.norm())
            if n > self.max_norm:
                self.token.mul_(self.max_norm / n)

    def before_loss(self, engine, batch):
        # ChenDarYen Perfusion.forward: the EMA runs before the UNet reads i*, on .data (no gradient)
        e = self.concept_encoding(engine, batch.texts[: batch.n_instance])
        self.i_star.copy_(self.ema * self.i_star + (1.0 - self.ema) * e.mean(0))

    def loss(self, pred, target, batch, prior_weight):
        return perfusion_loss(pred, target, batch.mask, batch.n_instance, prior_weight)

    def write(self, engine, output):
        """impasto's rank1 file (docs/formats.md) at output/adapter.rank1.safetensors; β/τ in its
        metadata are the inference defaults it is served with (a request may override them)."""
        path = os.path.join(output, FILE_NAME)
        f = self.rank1_file()
        rank1_format.write_rank1(
            path, layers={n: (k.detach(), v.detach()) for n, (k, v) in f.layers.items()}, i_star=f.i_star,
            token_embedding=self.token.detach(), placeholder=self.placeholder, super_word=self.super_word,
            beta=self.serve_beta, tau=self.serve_tau, fingerprint=self.fingerprint)
        return {"rank1": path}


def perfusion_loss(pred, target, mask, n_instance: int, prior_weight: float) -> torch.Tensor:
    """Semantics (ChenDarYen Perfusion.p_losses, logvar 0, no ELBO term):
        instance = mean over instance rows and elements of (mask·pred − mask·target)²
        loss     = instance + prior_weight · mean over class rows of (pred − target)²  (if any)
    pred, target: Shape [R, C, h, w]; mask: Shape [n_instance, 1, h, w] (broadcast over C).
    """
    n = n_instance
    loss = ((pred[:n] * mask - target[:n] * mask) ** 2).mean()
    if pred.shape[0] > n:
        loss = loss + prior_weight * ((pred[n:] - target[n:]) ** 2).mean()
    return loss


# ---------------------------------------------------------------------------- public API
def _check_real(name, v, *, lo=None, lo_open=False, hi_open=None):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise TrainInputError(f"{name}: expected a finite number, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise TrainInputError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi_open is not None and v >= hi_open:
        raise TrainInputError(f"{name}: must be < {hi_open}, got {v!r}")


def ensure_covariance(engine, captions=None) -> None:
    """The base's C⁻¹ must exist: found (adapter root, or shipped beside the model), else
    computed from `captions` as `impasto covariance` does, else a TrainInputError saying how."""
    try:
        C_inv = engine.adapters.covariance()
    except AdapterError as e:
        if captions is None:
            raise TrainInputError(
                f"the base model has no C⁻¹ for Perfusion ({e}); compute it once with `impasto covariance --model "
                f"<model> --captions <file> [--adapter-root <root>]`, or pass captions= (a list of captions)") from None
        captions = [c for c in (str(x).strip() for x in captions) if c]
        if not captions:
            raise TrainInputError("captions: no non-empty caption to estimate C⁻¹ from") from None
        engine.adapters.compute_covariance(engine.base.tokenizer, engine.base.text_encoder, captions)
        C_inv = engine.adapters.covariance()
    width = engine.base.text_encoder.config.hidden_size
    if tuple(C_inv.shape) != (width, width):
        raise TrainInputError(f"C⁻¹ has shape {tuple(C_inv.shape)}, this base's text encoder is {width} wide")


def perfusion_trainer(engine, images, *, placeholder: str = "<sks>", super_word: str | None = None, masks=None,
                      prompt_template: str | None = None, steps: int = 250, lr_embedding: float = 0.006,
                      lr_value: float = 0.03, batch_size: int = 4, beta: float = 0.75, tau: float = 0.1,
                      ema: float = 0.99, global_lock: bool = False, key_lock: bool = True, seed: int = 0,
                      hflip: bool = False, max_grad_norm: float = 0.0, weight_decay: float = 1e-2,
                      serve_beta: float | None = None, serve_tau: float | None = None, captions=None,
                      covariance_captions=None, max_norm_ratio: float | None = None, accumulate: int = 1) -> Trainer:
    """Check every input and build the loop's Trainer for one concept on `engine` (what
    `perfusion` runs; the tests replay its batches)."""
    for name, v in (("lr_embedding", lr_embedding), ("lr_value", lr_value)):
        _check_real(name, v, lo=0)
    _check_real("beta", beta)
    _check_real("tau", tau, lo=0, lo_open=True)
    _check_real("ema", ema, lo=0, hi_open=1)
    if serve_beta is not None:
        _check_real("serve_beta", serve_beta)
    if serve_tau is not None:
        _check_real("serve_tau", serve_tau, lo=0, lo_open=True)
    if max_norm_ratio is not None:
        _check_real("max_norm_ratio", max_norm_ratio, lo=0, lo_open=True)
    for name, v in (("key_lock", key_lock), ("global_lock", global_lock), ("hflip", hflip)):
        if not isinstance(v, bool):
            raise TrainInputError(f"{name}: expected True or False, got {v!r}")
    check_placeholder(engine, placeholder)
    if super_word is None:
        raise TrainInputError("super_word: the concept's category word is required (e.g. 'circle')")
    token_id(engine, super_word, "super_word")
    ensure_covariance(engine, covariance_captions)
    size = engine.base.unet.config.sample_size * engine.base.vae_scale_factor
    ims = load_images(images)
    ms = load_masks(masks, len(ims))
    prompts = instance_captions(captions, len(ims), prompt_template or DEFAULT_TEMPLATE, placeholder=placeholder,
                                super_word=super_word)
    examples = []
    for i, im in enumerate(ims):
        m = None
        if ms is not None:
            m = square_mask(ms[i], size)
            m = m / max(float(m.max()), 1e-12)  # ChenDarYen's dataset: mask / mask.max()
        examples.append(Example(square(im, size), prompts[i], m))
    method = Perfusion(engine, placeholder, super_word, prompts, beta=beta, tau=tau, ema=ema, key_lock=key_lock,
                       global_lock=global_lock, lr_embedding=lr_embedding, serve_beta=serve_beta, serve_tau=serve_tau,
                       max_norm_ratio=max_norm_ratio)
    return Trainer(engine, method, examples, steps=steps, lr=lr_value, batch_size=batch_size, seed=seed,
                   max_grad_norm=max_grad_norm, weight_decay=weight_decay, hflip=hflip, aug=False,
                   accumulate=accumulate)


def perfusion(base, images=None, *, placeholder: str = "<sks>", super_word: str | None = None, masks=None,
              prompt_template: str | None = None, steps: int = 250, lr_embedding: float = 0.006,
              lr_value: float = 0.03, batch_size: int = 4, beta: float = 0.75, tau: float = 0.1, ema: float = 0.99,
              global_lock: bool = False, key_lock: bool = True, seed: int = 0, output=None, progress: bool = True,
              resume: bool = False, checkpoint_every: int = 0, hflip: bool = False, max_grad_norm: float = 0.0,
              weight_decay: float = 1e-2, serve_beta: float | None = None, serve_tau: float | None = None,
              captions=None, covariance_captions=None, max_norm_ratio: float | None = None, accumulate: int = 1,
              device=None, dtype=None):
    """Train one Perfusion concept through the engine's own path and write impasto's `rank1`
    file to `output`/adapter.rank1.safetensors (docs/training.md, "Perfusion", for every default).

    images: a folder, image paths or PIL images of the concept; super_word: its category, one
    token (the key lock, and the placeholder row's initializer); masks: one per image (the loss
    mask; None: every pixel weighs 1); captions: one instance prompt per image (each with
    {placeholder}, optionally {super_word}; e.g. naming the image's own size, background and
    style, so the placeholder need not absorb them) instead of prompt_template. beta, tau: the
    gate during training; serve_beta, serve_tau: the file's inference defaults (None:
    rank1.DEFAULT_BETA, DEFAULT_TAU). key_lock=False also trains o*_K; global_lock=True makes
    the K pathway read the prompt with the super word in the placeholder's place.
    covariance_captions: used to compute the base's C⁻¹ when it has none. max_norm_ratio: clamp
    the placeholder's row to that multiple of the super word's row norm after every step.
    accumulate: micro-batches of batch_size per optimizer step (ChenDarYen's
    accumulate_grad_batches: 4), the EMA of i* updated before each micro-batch, as there.
    Returns a TrainResult (.files["rank1"]).
    """
    if output is None:
        raise TrainInputError("output: a folder to write the adapter to is required")
    output = os.fspath(output)
    engine, owned = resolve_engine(base, device, dtype)
    try:
        trainer = perfusion_trainer(
            engine, images, placeholder=placeholder, super_word=super_word, masks=masks,
            prompt_template=prompt_template, steps=steps, lr_embedding=lr_embedding, lr_value=lr_value,
            batch_size=batch_size, beta=beta, tau=tau, ema=ema, global_lock=global_lock, key_lock=key_lock,
            seed=seed, hflip=hflip, max_grad_norm=max_grad_norm, weight_decay=weight_decay, serve_beta=serve_beta,
            serve_tau=serve_tau, captions=captions, covariance_captions=covariance_captions,
            max_norm_ratio=max_norm_ratio, accumulate=accumulate)
        return train(trainer, output, checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    finally:
        if owned:
            engine.close()
