"""Images into a request (img2img init images) and cheap latent previews out of it.

An init image is checked and converted on the caller's thread (a bad one is a RequestError at
submit), exactly as diffusers' `VaeImageProcessor.preprocess` does, so the worker only encodes it.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import RequestError

MAX_IMAGE_SIDE = 8192  # larger inputs are refused before they are converted


def image_size(image, field: str = "image") -> tuple[int, int]:
    """(height, width) of a PIL image, an HxWx3 array or a [3, H, W] / [1, 3, H, W] tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        w, h = image.size
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise RequestError(f"{field}: expected an HxWx3 array, got shape {tuple(image.shape)}")
        h, w = image.shape[:2]
    elif isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if not (image.dim() == 3 and shape[0] == 3) and not (image.dim() == 4 and shape[:2] == (1, 3)):
            raise RequestError(f"{field}: expected a [3, H, W] or [1, 3, H, W] tensor, got shape {shape}")
        h, w = shape[-2:]
    else:
        raise RequestError(f"{field}: expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise RequestError(f"{field}: {w}x{h} pixels; each side must be in [1, {MAX_IMAGE_SIDE}]")
    return h, w


def preprocess(processor, image, height: int, width: int, field: str = "image") -> torch.Tensor:
    """Semantics: diffusers' `VaeImageProcessor.preprocess(image, height, width)`: the image as
    float32 Shape [1, 3, height, width] in [-1, 1] (resized when its size differs).

    A PIL image of any mode is converted to RGB first; an array is read as RGB in [0, 1]; a tensor
    as RGB in [-1, 1]. NaN/Inf or values out of range are a RequestError naming `field`.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        image = image.astype(np.float32)[None]
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise RequestError(f"{field}: array values must be finite and in [0, 1]")
    elif isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().reshape(1, 3, *image.shape[-2:])
        if not bool(torch.isfinite(image).all()) or image.min() < -1 or image.max() > 1:
            raise RequestError(f"{field}: tensor values must be finite and in [-1, 1]")
    out = processor.preprocess(image, height=height, width=width)
    return out.to(torch.float32)


def encode(vae, pixels: torch.Tensor, generators, n: int) -> torch.Tensor:
    """Semantics: diffusers img2img `prepare_latents` before the noise: scaling_factor times a
    sample of the VAE's latent distribution, Shape [n, C, h, w]; one sample per generator when
    `generators` is a list (each image its own), else one sample shared by the n images.
    pixels: Shape [1, 3, H, W]."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    with torch.inference_mode():
        if isinstance(generators, list):
            z = torch.cat([retrieve_latents(vae.encode(pixels), generator=g) for g in generators])
        else:
            z = retrieve_latents(vae.encode(pixels), generator=generators).repeat(n, 1, 1, 1)
    return vae.config.scaling_factor * z


# ------------------------------------------------------------------ previews
def fit_preview(vae, *, size: int = 8, samples: int = 8, seed: int = 0) -> torch.Tensor:
    """Semantics: a linear latent -> RGB map W, Shape [C + 1, 3] (last row the bias), fitted once
    by least squares on `samples` smooth random colour images: their VAE encodings (the latent
    distribution's mean, unscaled) against the images average-pooled to the latent grid.

    A fitted map rather than a published table (ComfyUI's `latent_rgb_factors`) works for any
    VAE, including the miniature model's 8-channel one; it costs one small encode per engine.
    """
    C, f = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator("cpu").manual_seed(seed)
    grid = torch.rand(samples, 3, 4, 4, generator=g)
    rgb = torch.nn.functional.interpolate(grid, size=(size * f, size * f), mode="bilinear", align_corners=False)
    p = next(vae.parameters())
    with torch.inference_mode():
        z = vae.encode((rgb * 2 - 1).to(p.device, p.dtype)).latent_dist.mean.float().cpu()
    pooled = torch.nn.functional.adaptive_avg_pool2d(rgb, z.shape[-2:])
    X = torch.cat([z.permute(0, 2, 3, 1).reshape(-1, C), torch.ones(z[:, :1].numel(), 1)], 1)
    Y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(X, Y).solution  # [C + 1, 3]


def latent_preview(latents: torch.Tensor, scaling_factor: float, W: torch.Tensor) -> np.ndarray:
    """Semantics: preview[n, y, x, :] = clip([z[n, :, y, x], 1] @ W, 0, 1) with z = latents /
    scaling_factor. latents: Shape [N, C, h, w]; returns float32 Shape [N, h, w, 3]."""
    z = latents.detach().float().cpu() / scaling_factor
    z = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1)
    return (z @ W).clamp(0, 1).numpy()
