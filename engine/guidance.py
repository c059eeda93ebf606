"""Guidance: how the branch predictions of one request become its noise prediction.

Branches of a request, in row order (N rows each): [uncond] (only when cfg > 1), cond, then one
per style. Pair Customization's style guidance (eq. 10/11), then diffusers' guidance rescale:

    e = e_u + cfg·(e_c − e_u) + Σᵢ wᵢ·(e_sᵢ − e_c)        (without uncond: e = e_c + Σᵢ ...)
    e ← rescale_noise_cfg(e, e_c, rescale)                 when rescale > 0

With no styles this is exactly diffusers' classifier-free guidance. The blend of every branch
of every request runs as one fused op, `impasto.kernels.guidance_blend`, over a table built
once per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from impasto.kernels import build_branch_table, guidance_blend


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
