"""Pair Customization (Jones et al., SIGGRAPH Asia 2024; PairCustomization/PairCustomization
`train_pair_customization_lora_sdxl.py`): a style LoRA learned from ONE (content, styled) pair.

Two LoRAs on every attention projection (to_q, to_k, to_v, to_out.0 of attn1 and attn2):

    W x + B_c A_c x                  content LoRA (the pair's content)
    W x + B_c A_c x + B_s A_s x      content + style LoRA (the pair's style)

A_c = Q[0:r_c], A_s = Q[r_c:r_c + r_s]: disjoint rows of one orthonormal basis per input width n
(Q = QR of an n x n Gaussian drawn after `torch.manual_seed(basis_seed)`, as the official code),
frozen; only B_c and B_s train (zero at the start, PEFT's "gaussian" init), so A_c A_sᵀ = 0 and
the two adapters read orthogonal subspaces of every input. Every step draws ONE noise ε and ONE
timestep t shared by both updates:

    content update:  L_c = mse(ε_{W+c}(x_t(content), t, content_prompt), ε)      -> AdamW step on B_c
    style update (step >= style_start):
                     L_s = mse(ε_{W+sg(c)+s}(x_t(style), t, style_prompt), ε)     -> AdamW step on B_s

with sg the stop-gradient: B_c is frozen (detached) in the style update. The saved adapter is
the style LoRA alone (the content LoRA stays in the checkpoints), written as a diffusers/PEFT
LoRA file with `impasto.style_suffix` metadata: `register(name, path, family="style")` serves it
through style guidance (engine/guidance.py).

Both updates run through the serving kernel: every target module's forward adds
`impasto.kernels.lora_delta(x, A_pool, B_pool, slots, scales)` with a two-slot pool (slot 0
content, slot 1 style); content rows name slot 0, style rows slots 0 and 1, and the kernel's
registered autograd brings the gradient to B. attn2's K/V are planned through the same hooks
(engine/plan.py with grad=True).

Official behaviour kept and changed: docs/training.md, "Pair Customization".
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from safetensors.torch import save_file

from impasto.kernels import lora_delta, lora_meta

from ..adapters.families.style import SUFFIX_KEY
from ..adapters.lora import attention_targets
from .core import Batch, Example, Method, Trainer, engine_forward, train
from .data import TrainInputError, load_images, square, to_tensor

BASIS_SEED = 123846  # the official `---orthonormal_basis_seed` default
DEFAULT_SUFFIX = "in sks style"
CONTENT, STYLE = "content", "style"


def orthonormal_basis(n: int, seed: int) -> torch.Tensor:
    """Q of the QR decomposition of an n x n standard Gaussian drawn from `seed` (fp32 [n, n]);
    the official code resets `torch.manual_seed(seed)` before each width, so each width's basis
    depends on the seed and n only."""
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.linalg.qr(torch.randn(n, n, generator=g)).Q


class PairCustomization(Method):
    """The two LoRAs: frozen orthonormal A_c, A_s per module, trained B_c, B_s (fp32)."""

    name = "pair_customization"
    aug = False  # the official script only resizes and crops

    def __init__(self, engine, *, content_rank: int, style_rank: int, basis_seed: int = BASIS_SEED,
                 targets: dict | None = None):
        """targets: {module: (in, out)}, default every attention projection of the UNet."""
        self.targets = dict(targets if targets is not None else attention_targets(engine.base.unet))
        if not self.targets:
            raise TrainInputError("the base UNet has no attention projection to put the LoRAs on")
        widths = sorted({k for k, _ in self.targets.values()})
        for name, r in (("content_rank", content_rank), ("style_rank", style_rank)):
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise TrainInputError(f"{name}: expected a positive integer, got {r!r}")
        if content_rank + style_rank > widths[0]:
            raise TrainInputError(f"content_rank + style_rank = {content_rank + style_rank}: the two A matrices are "
                                  f"disjoint rows of one orthonormal basis, so at most the narrowest input width "
                                  f"({widths[0]})")
        self.rc, self.rs = content_rank, style_rank
        self.R = max(content_rank, style_rank)
        self.dtype, self.device = engine.dtype, engine.device
        basis = {n: orthonormal_basis(n, basis_seed) for n in widths}
        self.A_c, self.A_s, self.B_c, self.B_s, self.A_pool = {}, {}, {}, {}, {}
        for module, (k, n) in self.targets.items():
            q = basis[k]
            self.A_c[module] = q[:content_rank].clone()  # [r_c, in], PEFT lora_A.weight layout
            self.A_s[module] = q[content_rank:content_rank + style_rank].clone()
            self.B_c[module] = torch.nn.Parameter(torch.zeros(n, content_rank))  # PEFT lora_B.weight layout
            self.B_s[module] = torch.nn.Parameter(torch.zeros(n, style_rank))
            A = torch.zeros(2, k, self.R)
            A[0, :, :content_rank] = self.A_c[module].t()
            A[1, :, :style_rank] = self.A_s[module].t()
            self.A_pool[module] = A.to(self.device, self.dtype)
        self.phase = CONTENT

    def parameters(self):
        out = {f"{m}.content.lora_B": p for m, p in self.B_c.items()}
        out.update({f"{m}.style.lora_B": p for m, p in self.B_s.items()})
        return out

    def _b_pool(self, module: str) -> torch.Tensor:
        """[2, R, N]: slot 0 = B_cᵀ, slot 1 = B_sᵀ, zero-padded to R. B_c is detached in the style
        phase (the paper's stop-gradient: content is frozen while the style trains), B_s in the
        content phase (inactive there: the kernel would give its unused slot a zero gradient, and
        AdamW would then decay it and age its moments, which the official step never does)."""
        bc, bs = self.B_c[module], self.B_s[module]
        bc, bs = (bc.detach(), bs) if self.phase == STYLE else (bc, bs.detach())
        pad = lambda b: torch.nn.functional.pad(b.t(), (0, 0, 0, self.R - b.shape[1]))  # noqa: E731
        return torch.stack([pad(bc), pad(bs)]).to(self.dtype)

    @contextlib.contextmanager
    def active(self, engine, phase: str):
        """During the block every target module adds its LoRA delta through `lora_delta`: slot 0
        (content) on every row, plus slot 1 (style) in the style phase. Covers the plan's attn2
        K/V as well as the UNet forward."""
        if phase not in (CONTENT, STYLE):
            raise ValueError(f"phase: {phase!r}")
        self.phase = phase
        row = [0] if phase == CONTENT else [0, 1]
        modules = dict(engine.base.unet.named_modules())
        pools = {}  # one B pool per module and forward, built lazily (stack keeps the autograd link)

        def make_hook(name):
            def hook(module, args, output):
                x = args[0]
                rows = x.shape[0]
                slots = torch.tensor([row] * rows, dtype=torch.int32, device=x.device)
                scales = torch.ones(slots.shape, dtype=torch.float32, device=x.device)
                if name not in pools:
                    pools[name] = self._b_pool(name)
                x3 = x.reshape(rows, -1, x.shape[-1])
                d = lora_delta(x3, self.A_pool[name], pools[name], slots, scales, meta=lora_meta(slots, 2))
                return output + d.reshape(output.shape)

            return hook

        handles = [modules[m].register_forward_hook(make_hook(m)) for m in self.targets]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.phase = CONTENT

    def lora_state(self, which: str = STYLE) -> dict:
        """One adapter as diffusers' save_lora_weights writes a PEFT UNet adapter:
        `unet.<module>.lora_A.weight` [r, in] and `unet.<module>.lora_B.weight` [out, r], fp32."""
        A, B = (self.A_s, self.B_s) if which == STYLE else (self.A_c, self.B_c)
        out = {}
        for m in self.targets:
            out[f"unet.{m}.lora_A.weight"] = A[m].float().contiguous()
            out[f"unet.{m}.lora_B.weight"] = B[m].detach().float().contiguous()
        return out

    def write(self, engine, output):
        path, suffix = self.output_file, self.suffix
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # no alpha keys: lora_alpha = rank, scale 1 (as the official file)
        save_file(self.lora_state(STYLE), path, metadata={"format": "pt", SUFFIX_KEY: suffix})
        files = {"style": path}
        content = getattr(self, "content_file", None)
        if content:  # the content LoRA too (a plain LoRA: the official checkpoints keep it), for diagnosis
            os.makedirs(os.path.dirname(os.path.abspath(content)), exist_ok=True)
            save_file(self.lora_state(CONTENT), content, metadata={"format": "pt"})
            files["content"] = content
        return files


class PairTrainer(Trainer):
    """The loop of core.Trainer with Pair Customization's step: one shared ε and t, the content
    update, then (from `style_start`) the style update, each with its own AdamW step."""

    def __init__(self, engine, method: PairCustomization, content_image, style_image, *, content_prompt: str,
                 style_prompt: str, steps: int, style_start: int, lr: float, seed: int, weight_decay: float = 1e-4,
                 content_updates: bool = True, style_timesteps=None, shift: int = 0, flip: bool = False,
                 crop: float = 1.0, permute_channels: bool = False):
        """content_updates=False: no content update (B_c stays 0), the style LoRA alone learns
        the style image: the single-image LoRA baseline, same parametrization, rank and steps.

        content_image, style_image, content_prompt, style_prompt may be equal-length lists
        (several pairs of one style): each step draws one pair with the run's numpy RNG.
        style_timesteps=(lo, hi): the style update runs only at the steps whose shared t is in
        [lo, hi) (the content update at every step; ε and t stay shared).
        shift, flip: the same random horizontal circular shift by up to `shift` px and (flip)
        horizontal mirror for both images of the pair, drawn each step with the numpy RNG.
        crop < 1: the same random square crop (side drawn uniformly in [crop·S, S] px, position
        uniform) of both images, resized back to S (bilinear, antialiased), each step.
        permute_channels: the same random permutation of the RGB channels for both images, each
        step (a paired colour augmentation; the prompts are unchanged)."""
        many = isinstance(content_image, (list, tuple))
        pairs = list(zip(content_image, style_image, content_prompt, style_prompt)) if many else \
            [(content_image, style_image, content_prompt, style_prompt)]
        super().__init__(engine, method, [Example(c, cp) for c, _, cp, _ in pairs], steps=steps, lr=lr, batch_size=1,
                         seed=seed, max_grad_norm=0.0, weight_decay=weight_decay, aug=False)
        if not isinstance(style_start, int) or isinstance(style_start, bool) or not 0 <= style_start < steps:
            raise TrainInputError(f"style_start: expected an integer in [0, steps={steps}), got {style_start!r}")
        self.style_start = style_start
        self.pairs = pairs
        self.style_losses: list[float] = []
        self.content_updates = content_updates
        self.style_timesteps = style_timesteps
        self.shift, self.flip, self.crop = shift, flip, crop
        self.permute_channels = permute_channels

    def make_batch(self) -> Batch:
        """Latents of [content, style] (posterior samples), one ε and one t shared by both rows."""
        i = int(self.rng.integers(len(self.pairs))) if len(self.pairs) > 1 else 0
        content, style, content_prompt, style_prompt = self.pairs[i]
        pixels = torch.stack([to_tensor(content), to_tensor(style)])
        if self.shift:  # one shift for both images, so the pair stays aligned
            pixels = torch.roll(pixels, int(self.rng.integers(-self.shift, self.shift + 1)), dims=3)
        if self.flip and self.rng.random() < 0.5:
            pixels = torch.flip(pixels, dims=(3,))
        if self.crop < 1.0:  # one crop for both images: content and style stay aligned
            size = pixels.shape[-1]
            side = int(self.rng.integers(int(np.ceil(self.crop * size)), size + 1))
            y, x = (int(v) for v in self.rng.integers(0, size - side + 1, size=2))
            pixels = torch.nn.functional.interpolate(pixels[:, :, y:y + side, x:x + side], size=(size, size),
                                                     mode="bilinear", antialias=True, align_corners=False)
        if self.permute_channels:  # one permutation for both images: the style's tones move with the object's
            pixels = pixels[:, torch.from_numpy(self.rng.permutation(3))]
        latents, noise, t = self.draw(pixels, rows=1)
        mask = torch.ones(1, 1, *latents.shape[2:], device=latents.device)
        return Batch([content_prompt, style_prompt], latents, noise.repeat(2, 1, 1, 1), t.repeat(2), mask, 1)

    def phase_loss(self, batch: Batch, phase: str) -> torch.Tensor:
        """ε-MSE of one update: row 0 (content) or row 1 (style) of `batch`, through the engine."""
        i = 0 if phase == CONTENT else 1
        lat, noise, t = batch.latents[i:i + 1], batch.noise[i:i + 1], batch.timesteps[i:i + 1]
        x_t = self.noise_scheduler.add_noise(lat, noise, t)
        e = self.engine
        with e._worker.boundary, self.method.active(e, phase):
            pred = engine_forward(e, self.method, [batch.texts[i]], x_t, t).float()
        return torch.nn.functional.mse_loss(pred, noise.float(), reduction="mean")

    def _update(self, loss: torch.Tensor, what: str) -> float:
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"step {self.step}: the {what} loss is {float(loss.detach())} (lr too high?)")
        loss.backward()
        self.optimizer.step()  # parameters without a gradient (the other adapter) are skipped
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def train_step(self) -> float:
        batch = self.make_batch()
        if self.content_updates:
            self.losses.append(self._update(self.phase_loss(batch, CONTENT), "content"))
        window = self.style_timesteps
        t = int(batch.timesteps[0])
        if self.step >= self.style_start and (window is None or window[0] <= t < window[1]):
            self.style_losses.append(self._update(self.phase_loss(batch, STYLE), "style"))
        self.step += 1
        done = self.losses or self.style_losses
        return done[-1] if done else float("nan")

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["style_losses"] = torch.tensor(self.style_losses, dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict, where: str) -> None:
        super().load_state_dict(state, where)
        self.style_losses = [float(x) for x in state.get("style_losses", [])]


def checkpoint_folder(output: str) -> str:
    """Where a run writing `output` keeps its checkpoints: `<output without .safetensors>-checkpoints/`."""
    stem = output[: -len(".safetensors")] if output.endswith(".safetensors") else output
    return stem + "-checkpoints"


def pair(base, content_image, style_image, *, content_prompt, style_prompt=None, content_rank=8, style_rank=8,
         steps=750, style_start=250, lr=1e-5, seed=0, basis_seed=BASIS_SEED, suffix=None, output, progress=True,
         resume=False, checkpoint_every=0, weight_decay=1e-4, device=None, dtype=None, content_updates=True,
         content_output=None, style_timesteps=None, shift=0, flip=False, crop=1.0, permute_channels=False):
    """Train a style LoRA from one (content, style) image pair; see the module docstring.

    base: "tiny", a model folder or an Engine. content_image, style_image: a path or PIL image
    each (resized and center-cropped to the model's resolution). style_prompt: default
    `content_prompt + " " + suffix`; suffix (default "in sks style") is written as the file's
    `impasto.style_suffix`, the text style guidance appends to the style branch. output: the
    .safetensors file to write; checkpoints (every `checkpoint_every` steps) go to
    `checkpoint_folder(output)`, and resume=True continues from the latest one, bit for bit.
    Defaults are the official script's (ranks scaled to the model: r_c + r_s must fit the
    narrowest attention input). Returns a TrainResult; .files["style"] is the adapter file.
    content_updates=False trains the single-image LoRA baseline (the style image alone, the
    style LoRA from step 0; content_image unused, style_start ignored). Lists of images and
    prompts train on several pairs of one style; style_timesteps, shift, flip, crop and
    permute_channels are the options beyond the official recipe (PairTrainer), all off by default.
    """
    from .custom_diffusion import resolve_engine

    if output is None:
        raise TrainInputError("output: the .safetensors file to write the style LoRA to is required")
    output = os.fspath(output)
    if not output.endswith(".safetensors"):
        raise TrainInputError(f"output: {output!r} should name a .safetensors file")
    if content_output is not None:
        content_output = os.fspath(content_output)
        if not content_output.endswith(".safetensors") or os.path.abspath(content_output) == os.path.abspath(output):
            raise TrainInputError(f"content_output: {content_output!r} should name a .safetensors file other "
                                  f"than output")
    many = isinstance(content_image, (list, tuple))
    cimgs, simgs = (list(content_image), list(style_image)) if many else ([content_image], [style_image])
    cps = list(content_prompt) if isinstance(content_prompt, (list, tuple)) else [content_prompt] * len(cimgs)
    sps = list(style_prompt) if isinstance(style_prompt, (list, tuple)) else [style_prompt] * len(cimgs)
    if not cimgs or len(simgs) != len(cimgs) or len(cps) != len(cimgs) or len(sps) != len(cimgs):
        raise TrainInputError(f"content_image, style_image, content_prompt, style_prompt: several pairs need "
                              f"equal-length lists, got {len(cimgs)}, {len(simgs)}, {len(cps)}, {len(sps)}")
    for name, texts in (("content_prompt", cps), ("style_prompt", sps), ("suffix", [suffix])):
        for text in texts:
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise TrainInputError(f"{name}: expected a non-empty string, got {text!r}")
    if any(c is None for c in cps):
        raise TrainInputError("content_prompt: a caption of the content image is required")
    suffix = DEFAULT_SUFFIX if suffix is None else suffix.strip()
    sps = [c + " " + suffix if sp is None else sp for c, sp in zip(cps, sps)]
    if style_timesteps is not None:
        ok = isinstance(style_timesteps, (list, tuple)) and len(style_timesteps) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in style_timesteps)
        if not ok or not 0 <= style_timesteps[0] < style_timesteps[1]:
            raise TrainInputError(f"style_timesteps: expected (lo, hi) integers with 0 <= lo < hi, got {style_timesteps!r}")
        style_timesteps = (int(style_timesteps[0]), int(style_timesteps[1]))
    if not isinstance(shift, int) or isinstance(shift, bool) or shift < 0:
        raise TrainInputError(f"shift: expected an integer >= 0 (pixels), got {shift!r}")
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1:
        raise TrainInputError(f"crop: expected the smallest crop side as a fraction in (0, 1], got {crop!r}")
    if not isinstance(permute_channels, bool):
        raise TrainInputError(f"permute_channels: expected True or False, got {permute_channels!r}")
    if not isinstance(flip, bool):
        raise TrainInputError(f"flip: expected True or False, got {flip!r}")
    _check_number("lr", lr)
    _check_number("weight_decay", weight_decay)
    engine, owned = resolve_engine(base, device, dtype)
    try:
        size = engine.base.unet.config.sample_size * engine.base.vae_scale_factor
        contents = [square(im, size) for im in load_images(cimgs, "content_image")]
        styles = [square(im, size) for im in load_images(simgs, "style_image")]
        method = PairCustomization(engine, content_rank=content_rank, style_rank=style_rank, basis_seed=basis_seed)
        method.output_file, method.suffix, method.content_file = output, suffix, content_output
        trainer = PairTrainer(engine, method, contents, styles, content_prompt=cps, style_prompt=sps,
                              steps=steps, style_start=style_start if content_updates else 0, lr=lr, seed=seed,
                              weight_decay=weight_decay, content_updates=content_updates,
                              style_timesteps=style_timesteps, shift=shift, flip=flip, crop=float(crop),
                              permute_channels=permute_channels)
        result = train(trainer, checkpoint_folder(output), checkpoint_every=checkpoint_every, resume=resume,
                       progress=progress)
        result.path = output
        result.style_losses = list(trainer.style_losses)
        return result
    finally:
        if owned:
            engine.close()


def _check_number(name, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
        raise TrainInputError(f"{name}: expected a finite number >= 0, got {v!r}")
