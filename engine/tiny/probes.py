"""Probes: a small CNN that reads a world image's attributes.

Heads (classes in engine/tiny/world.py order): shape (8 seen shapes + 3 novel objects), colour
(8), background (14), style (5 seen + 3 novel + world.EXTRA_STYLES), count (1 or 2), size (3).
Trained on the whole world, held-out objects and styles included (the probes are the judges,
not the base model); accuracy on unseen generator seeds is in docs/tiny.md.

The extra styles were added after that training, without touching it: the style head keeps its
8 classes, and each extra style has its own small detector (`StyleDetector`, fitted by
`fit_detector`) whose probability d splits the style reading as

    P(extra style) = d = σ(SHARPNESS · logit),   P(style s of the 8) = (1 − d) · softmax(head)[s]

so every other weight is the original training's, bit for bit, and a reading of the 8 styles
changes only where a detector fires (how often, on unseen seeds: docs/training.md, Pair
Customization).

Input: float [N, 3, 32, 32] in [-1, 1] (the VAE's range), or PIL images / uint8 arrays via
`Probes.read`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn as nn

from . import world

CLASSES = dict(shape=world.PROBE_SHAPES, colour=world.COLOUR_NAMES, background=world.BACKGROUNDS,
               style=world.ALL_STYLES, count=world.COUNTS, size=world.SIZE_NAMES)


def _block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2),
    )


BASE_STYLES = len(world.ALL_STYLES) - len(world.EXTRA_STYLES)  # the style head's own classes
# A detector's logit is multiplied by this before it splits the style reading: the decision
# (logit > 0) is its calibrated one, and where it does not fire (logit < -0.5 on all but a few
# of the other styles' images) the 8-style reading keeps at least 1 - e^-8 of its probability.
SHARPNESS = 16.0


class StyleDetector(nn.Module):
    """One extra style's reader: [N, 3, 32, 32] in [-1, 1] -> logit [N] that the image is in it."""

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(4, w), nn.SiLU())
        self.features = nn.Sequential(stem, _block(w, 2 * w), _block(2 * w, 2 * w))
        self.out = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.out(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)).squeeze(1)


class Probes(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU())
        self.features = nn.Sequential(stem, _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w))
        sizes = {k: len(v) for k, v in CLASSES.items()}
        sizes["style"] = BASE_STYLES
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 2, n) for k, n in sizes.items()})
        self.extra = nn.ModuleDict({s: StyleDetector() for s in world.EXTRA_STYLES})

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 3, 32, 32] in [-1, 1] -> the features every head reads, [N, 8 * width]."""
        h = self.features(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)

    def forward(self, x: torch.Tensor) -> dict:
        """x: [N, 3, 32, 32] in [-1, 1] -> {attribute: logits [N, classes]}."""
        h = self.pooled(x)
        out = {k: head(h) for k, head in self.heads.items()}
        if len(self.extra):  # log-probabilities: (1 - P(any extra)) · softmax(head), then each extra's
            e = SHARPNESS * torch.stack([det(x) for det in self.extra.values()], 1)
            q = torch.log_softmax(torch.cat([e, torch.zeros_like(e[:, :1])], 1), 1)
            out["style"] = torch.cat([torch.log_softmax(out["style"], 1) + q[:, -1:], q[:, :-1]], 1)
        return out

    @torch.no_grad()
    def read(self, images, batch_size: int = 256) -> dict:
        """Class probabilities for a list of PIL images or a uint8 array [N, 32, 32, 3].
        Returns {attribute: float array [N, classes]}."""
        x = as_tensor(images)
        was = self.training
        self.eval()
        outs = {k: [] for k in CLASSES}
        for s in range(0, len(x), batch_size):
            for k, v in self(x[s : s + batch_size]).items():
                outs[k].append(v.float().softmax(1))
        self.train(was)
        return {k: torch.cat(v).numpy() for k, v in outs.items()}

    def predict(self, images) -> list[dict]:
        """Most likely class name of each attribute, per image."""
        probs = self.read(images)
        n = len(next(iter(probs.values())))
        return [{k: CLASSES[k][int(probs[k][i].argmax())] for k in CLASSES} for i in range(n)]


def as_tensor(images) -> torch.Tensor:
    """PIL images, uint8 arrays [N,H,W,3] or a float tensor [N,3,H,W] in [-1,1] -> the latter."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def load_probes(path: str | None = None, *, without_extra: bool = False) -> Probes:
    """The shipped probes (engine/tiny/model/probes/probes.safetensors) or those at `path`.
    without_extra: a file from before the extra styles' detectors (they are left untrained)."""
    from safetensors.torch import load_file

    from . import SHIPPED_DIR

    path = path or os.path.join(SHIPPED_DIR, "probes", "probes.safetensors")
    model = Probes()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=False)
    missing = [k for k in missing if not (without_extra and k.startswith("extra."))]
    if missing or unexpected:
        raise ValueError(f"{path}: not a probes file of this world "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)




# ---------------------------------------------------------------------------- an extra style's detector
DETECTOR_SEED = 4  # the world stream a detector is fitted on (engine/tiny/train.py's stages use 1-3)


def style_class_data(style: str, n: int, seed: int = DETECTOR_SEED) -> tuple[np.ndarray, np.ndarray]:
    """n renders (uint8 [n, 32, 32, 3]) and labels [n] (1: in `style`): scene i of stream
    `seed`, every other one in `style`, the rest in a style drawn uniformly over the others."""
    ims, labels = [], []
    others = [x for x in world.ALL_STYLES if x != style]
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        st = style if i % 2 else str(rng.choice(others))
        scene = world.sample_scene(rng, novel_objects=0.25, style=st)
        ims.append(world.render(scene, rng))
        labels.append(int(st == style))
    return np.stack(ims), np.array(labels)


def vae_round_trip(vae, images_u8: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 [N, 32, 32, 3] -> the same after encode -> decode with the mean latent."""
    out = []
    for s in range(0, len(images_u8), batch_size):
        x = as_tensor(images_u8[s:s + batch_size]).to(vae.device, vae.dtype)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def fit_detector(vae, style: str, *, n: int = 4096, steps: int = 1200, batch_size: int = 128, lr: float = 2e-3,
                 max_false: float = 0.001, seed: int = DETECTOR_SEED) -> StyleDetector:
    """Semantics: a StyleDetector for `style`, fitted on `style_class_data(style, n, seed)`, each
    image clean and after `vae_round_trip` (the probes judge generations, which come through the
    VAE): binary cross-entropy, AdamW, `steps` batches drawn with `seed`; then its output bias is
    lowered until it fires on at most `max_false` of the fitting set's other-style images.
    Deterministic on CPU with one thread."""
    images, labels = style_class_data(style, n, seed)
    x = as_tensor(np.concatenate([images, vae_round_trip(vae, images)]))
    y = torch.from_numpy(np.concatenate([labels, labels])).float()
    torch.manual_seed(seed)
    det = StyleDetector()
    opt = torch.optim.AdamW(det.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        loss = nn.functional.binary_cross_entropy_with_logits(det(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    with torch.no_grad():
        logit = torch.cat([det(x[s:s + 512]) for s in range(0, len(x), 512)])
        det.out.bias -= max(0.0, float(torch.quantile(logit[y == 0], 1.0 - max_false)))
    return det.requires_grad_(False)


def main(argv=None) -> None:
    """python -m impasto.tiny.probes add-style banded --from OLD.safetensors --to NEW_DIR

    The probes of OLD (every tensor copied as it is) plus a detector for the extra style, fitted
    by `fit_detector`; writes probes.safetensors (fp16, like every shipped file) and config.json."""
    import argparse
    import json

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    from . import SHIPPED_DIR

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("command", choices=["add-style"])
    p.add_argument("style", choices=world.EXTRA_STYLES)
    p.add_argument("--from", dest="src", required=True)
    p.add_argument("--to", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(SHIPPED_DIR, subfolder="vae", local_files_only=True).eval()
    det = fit_detector(vae, a.style)
    state = {k: v for k, v in load_file(a.src).items() if not k.startswith(f"extra.{a.style}.")}
    state.update({f"extra.{a.style}.{k}": v.half().contiguous() for k, v in det.state_dict().items()})
    os.makedirs(a.to, exist_ok=True)
    save_file(state, os.path.join(a.to, "probes.safetensors"))
    with open(os.path.join(a.to, "config.json"), "w") as f:
        json.dump({k: list(map(str, v)) for k, v in CLASSES.items()}, f, indent=1)


if __name__ == "__main__":
    main()
