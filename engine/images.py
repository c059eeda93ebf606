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


# ------------------------------------------------------------------ inpainting
def mask_size(mask, field: str = "mask_image") -> tuple[int, int]:
    """(height, width) of a mask: a PIL image, an HxW array or a [H, W] / [1, H, W] / [1, 1, H, W] tensor."""
    from PIL import Image

    if isinstance(mask, Image.Image):
        w, h = mask.size
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        shape = tuple(mask.shape)
        if len(shape) < 2 or any(s != 1 for s in shape[:-2]) or len(shape) > 4:
            raise RequestError(f"{field}: expected an HxW array or a [H, W] / [1, 1, H, W] tensor, got shape {shape}")
        h, w = shape[-2:]
    else:
        raise RequestError(f"{field}: expected a PIL image, a numpy array or a torch tensor, got {type(mask).__name__}")
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise RequestError(f"{field}: {w}x{h} pixels; each side must be in [1, {MAX_IMAGE_SIDE}]")
    return h, w


def preprocess_mask(processor, mask, height: int, width: int, field: str = "mask_image") -> torch.Tensor:
    """Semantics: diffusers' inpainting `mask_processor.preprocess(mask, height, width)` (grayscale,
    resized, binarized at 0.5): float32 Shape [1, 1, height, width] in {0, 1}, 1 = repaint.

    A PIL image of any mode is read as grayscale (white = repaint); an array or tensor holds values
    in [0, 1]. NaN/Inf or values out of range are a RequestError naming `field`.
    `processor`: a VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True).
    """
    from PIL import Image

    mask_size(mask, field)
    if not isinstance(mask, Image.Image):
        is_array = isinstance(mask, np.ndarray)
        values = torch.from_numpy(mask.astype(np.float32)) if is_array else mask.detach().float().cpu()
        if not bool(torch.isfinite(values).all()) or values.min() < 0 or values.max() > 1:
            raise RequestError(f"{field}: values must be finite and in [0, 1]")
        mask = values.reshape(*values.shape[-2:], 1).numpy() if is_array else values.reshape(1, 1, *values.shape[-2:])
    return processor.preprocess(mask, height=height, width=width).to(torch.float32)


def encode_first(vae, pixels: torch.Tensor, generators) -> torch.Tensor:
    """Semantics: diffusers' inpainting `_encode_vae_image` of one image: scaling_factor times a
    sample of its latent distribution, Shape [1, C, h, w], drawn with the first generator of a
    list (the pipeline's image batch is one image, so only generator[0] is used) or the one given.
    pixels: Shape [1, 3, H, W]."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents

    g = generators[0] if isinstance(generators, list) else generators
    with torch.inference_mode():
        return vae.config.scaling_factor * retrieve_latents(vae.encode(pixels), generator=g)


class Inpainting:
    """One request's inpainting state, made by `start_inpainting`.

    `mask`: Shape [n, 1, h, w] in {0, 1} (1 = repaint), the mask on the latent grid;
    `concat`: inpainting UNet only, Shape [n, 1 + C, h, w] = [mask, masked-image latents],
      appended to the request's UNet input channels in every step;
    `image`, `noise`: regular UNet only, Shape [n, C, h, w]: the clean image latents and the
      start noise, blended back outside the mask after every step.
    """

    def __init__(self, mask, concat=None, image=None, noise=None):
        self.mask, self.concat, self.image, self.noise = mask, concat, image, noise


def start_inpainting(vae, scheduler, init: torch.Tensor, mask: torch.Tensor, generators, n: int, shape: tuple,
                     timestep: torch.Tensor, strength: float, concat: bool, device, dtype):
    """Semantics: diffusers' StableDiffusionInpaintPipeline before its loop (prepare_latents and
    prepare_mask_latents), drawing from `generators` in the pipeline's order:
      regular UNet or strength < 1:  z0 = encode_first(init)                 (repeated to n)
      noise = randn [n, *shape]                                              (one per generator)
      latents = noise * init_noise_sigma  if strength == 1  else  add_noise(z0, noise, timestep)
      masked = init * (mask < 0.5);  inpainting UNet: encode_first(masked);  regular UNet: the same
      draw is made and discarded (diffusers encodes the masked image there too, unused)
      mask_latent = nearest interpolation of mask to the latent grid
    init: Shape [1, 3, H, W] in [-1, 1]; mask: Shape [1, 1, H, W] in {0, 1}; shape: (C, h, w).
    concat: the UNet is an inpainting UNet (in_channels = 2C + 1). Returns (latents, Inpainting).
    """
    from diffusers.utils.torch_utils import randn_tensor

    init = init.to(device, dtype)
    z0 = encode_first(vae, init, generators).repeat(n, 1, 1, 1) if (not concat or strength < 1) else None
    noise = randn_tensor((n, *shape), generator=generators, device=device, dtype=dtype)
    if strength == 1.0:  # diffusers' is_strength_max: pure noise, whatever the image
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(z0, noise, timestep.reshape(1).repeat(n))
    masked = init * (mask.to(device, dtype) < 0.5)
    if concat:
        masked_latents = encode_first(vae, masked, generators).repeat(n, 1, 1, 1)
    else:  # keep the generators where diffusers leaves them (schedulers that draw noise read them next)
        g = generators[0] if isinstance(generators, list) else generators
        p = next(vae.parameters())
        randn_tensor((1, *shape), generator=g, device=p.device, dtype=p.dtype)
    m = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(device, dtype).repeat(n, 1, 1, 1)
    if concat:
        return latents, Inpainting(m, concat=torch.cat([m, masked_latents], 1))
    return latents, Inpainting(m, image=z0, noise=noise)


def blend_known(scheduler, inpainting: Inpainting, latents: torch.Tensor, timesteps, i: int) -> torch.Tensor:
    """Semantics: diffusers' regular-UNet inpainting after scheduler step i:
      known = image latents noised to timesteps[i + 1] (clean after the last step)
      latents = (1 - mask) * known + mask * latents
    latents: Shape [n, C, h, w]; timesteps: the request's schedule."""
    known = inpainting.image
    if i < len(timesteps) - 1:
        known = scheduler.add_noise(known, inpainting.noise, timesteps[i + 1].reshape(1))
    return (1 - inpainting.mask) * known + inpainting.mask * latents
