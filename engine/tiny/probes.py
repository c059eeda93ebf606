"""Probes: a small CNN that reads a world image's attributes.

Heads (classes in engine/tiny/world.py order): shape (8 seen shapes + 3 novel objects), colour
(8), background (14), style (5 seen + 3 novel), count (1 or 2), size (3). Trained on the whole
world, held-out objects and styles included (the probes are the judges, not the base model);
accuracy on unseen generator seeds is in docs/tiny.md.

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


class Probes(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU())
        self.features = nn.Sequential(stem, _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 4 * w))
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 2, len(v)) for k, v in CLASSES.items()})

    def forward(self, x: torch.Tensor) -> dict:
        """x: [N, 3, 32, 32] in [-1, 1] -> {attribute: logits [N, classes]}."""
        h = self.features(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}

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


def load_probes(path: str | None = None) -> Probes:
    """The shipped probes (engine/tiny/model/probes/probes.safetensors) or those at `path`."""
    from safetensors.torch import load_file

    from . import SHIPPED_DIR

    path = path or os.path.join(SHIPPED_DIR, "probes", "probes.safetensors")
    model = Probes()
    model.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return model.eval().requires_grad_(False)
