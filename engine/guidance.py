"""Guidance: how the branch predictions of one request become its noise prediction.

Branches of a request, in row order: [uncond] (only when cfg > 1), cond, then one per style.
With no styles this is exactly diffusers' classifier-free guidance:
    e = e_u + cfg · (e_c − e_u)                      (cfg > 1; else e = e_c)
then, when rescale > 0, diffusers' `rescale_noise_cfg(e, e_c, rescale)` (arXiv 2305.08891 §3.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg


@dataclass(frozen=True)
class BranchLayout:
    """Where one request's branches sit in the step's rows.

    `start`: first row of the request; `images`: N rows per branch; `cfg`: the guidance scale;
    `has_uncond`: whether an uncond branch comes first; `rescale`: guidance rescale factor.
    """

    start: int
    images: int
    cfg: float
    has_uncond: bool
    rescale: float = 0.0

    @property
    def num_rows(self) -> int:
        return self.images * (2 if self.has_uncond else 1)


def blend(noise: torch.Tensor, layouts: list[BranchLayout]) -> torch.Tensor:
    """Semantics: for each request j (layout l, N = l.images rows per branch):
        out[j's N latents] = e_u + l.cfg · (e_c − e_u)   (or e_c without uncond), then rescale.

    noise: Shape [rows, C, h, w], the UNet output of every branch row of every request.
    Returns Shape [sum of N, C, h, w], in request order.
    """
    outs = []
    for l in layouts:
        n = l.images
        if l.has_uncond:
            e_u = noise[l.start : l.start + n]
            e_c = noise[l.start + n : l.start + 2 * n]
            e = e_u + l.cfg * (e_c - e_u)
            if l.rescale > 0.0:
                e = rescale_noise_cfg(e, e_c, guidance_rescale=l.rescale)
        else:
            e = noise[l.start : l.start + n]
        outs.append(e)
    return torch.cat(outs)
