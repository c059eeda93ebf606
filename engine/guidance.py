"""Guidance: how the branch predictions of one request become its noise prediction.

Branches of a request, in row order (N rows each): [uncond] (only when cfg > 1), cond, then one
per style. Pair Customization's style guidance (eq. 10/11), then diffusers' guidance rescale:

    e = e_u + cfg·(e_c − e_u) + Σᵢ wᵢ·(e_sᵢ − e_c)        (without uncond: e = e_c + Σᵢ ...)
    e ← rescale_noise_cfg(e, e_c, rescale)                 when rescale > 0

With no styles this is exactly diffusers' classifier-free guidance. The blend of every branch
of every request runs as one fused op, `impasto.kernels.guidance_blend`, over a table built
once per group.

A style may be scheduled over steps: `Guidance(styles={"wavy": Adapter("wavy", 4.0, start=0.2)})`
(the weight is the Adapter's scale; step i of n is active iff start <= i/n < end). In an
inactive step the style LoRA is at scale 0 in its branch (the per-row scale table rewritten in
place, as for a scheduled UNet LoRA): the branch is then the base on the suffixed prompt, as
the official pipeline's `set_adapters(name, 0)` before `start_LoRA_step` leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impasto.kernels import build_branch_table, guidance_blend

from .api import Adapter, Guidance, _finite
from .errors import RequestError


@dataclass(frozen=True)
class BranchLayout:
    """Where one request's branches sit in the step's rows (read by `build_branch_table`).

    `start`: first row; `images`: N rows per branch; `cfg`: guidance scale; `has_uncond`:
    whether an uncond branch comes first; `style_weights`: one weight per style branch;
    `rescale`: guidance rescale factor.
    """

    start: int
    images: int
    cfg: float
    has_uncond: bool
    style_weights: tuple = ()
    rescale: float = 0.0

    @property
    def num_rows(self) -> int:
        return self.images * (1 + int(self.has_uncond) + len(self.style_weights))


def branch_table(layouts: list[BranchLayout], device):
    """The fixed-size blend table of a group; built once, reused by every step."""
    return build_branch_table(layouts, device=device)


def blend(noise: torch.Tensor, table) -> torch.Tensor:
    """Semantics: see the module docstring; one output latent per (request, image).

    noise: Shape [rows, C, h, w], the UNet output of every branch row of every request.
    Returns Shape [latents, C, h, w], in request order.
    """
    return guidance_blend(noise, table)


def split_style_windows(guidance):
    """Semantics: `Guidance.styles` entries are a weight or an `Adapter(name, weight, start=,
    end=)`; returns (the guidance with every entry its plain weight, the scheduled styles as
    `Adapter(name, 1.0, start=, end=)`: their LoRA's scale in their branch while active).
    Anything but a Guidance with a dict of styles is returned as is (normalize_guidance judges it)."""
    if not isinstance(guidance, Guidance) or not isinstance(guidance.styles, dict):
        return guidance, ()
    weights, windows = {}, []
    for name, value in guidance.styles.items():
        if not isinstance(value, Adapter):
            weights[name] = value
            continue
        where = f"guidance.styles[{name!r}]"
        if value.name != name:
            raise RequestError(f"{where}: the Adapter is named {value.name!r}; name it as its key")
        if value.options:
            raise RequestError(f"{where}: a style takes a weight, start and end only, "
                               f"got options {sorted(value.options)}")
        if not (_finite(value.start) and _finite(value.end) and 0.0 <= value.start < value.end <= 1.0):
            raise RequestError(f"{where}: start and end must be fractions of the schedule with 0 <= start < end <= 1, "
                               f"got start={value.start!r}, end={value.end!r}")
        weights[name] = value.scale
        if value.scheduled:
            windows.append(Adapter(name, 1.0, start=float(value.start), end=float(value.end)))
    return Guidance(cfg=guidance.cfg, styles=weights, rescale=guidance.rescale), tuple(windows)
