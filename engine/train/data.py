"""Training images in: a folder, paths or PIL images, each checked and named when refused; the
Custom Diffusion augmentation (random rescale with its valid-region mask).

Semantics of `augment` (diffusers examples/custom_diffusion `CustomDiffusionDataset`, at any
resolution R with latent side m = R / f):
    with probability 0.66: s ~ U{R//3 .. R}, the image resized to s x s is pasted at a random
        spot of a zero canvas; mask = the latent cells the pasted image covers entirely;
        s < 0.6 R prefixes the prompt with "a far away " or "very small ";
    otherwise: s ~ U{int(1.2 R) .. int(1.4 R) - 1}, a random R x R crop of the resized image;
        mask = 1 everywhere; the prompt gets "zoomed in " or "close up ".
    hflip (optional) first, with probability 0.5.
    A user mask (`masks=`) goes through the same flip, resize and paste and multiplies the
    valid-region mask (area-averaged to the latent grid).
Deviation, for small models: diffusers' mask is `top//f + 1 : (top+s)//f - 1`, one latent cell
inside the covered cells on each side. On an 8-cell latent (the tiny model) that margin empties
the mask of every paste smaller than ~4 cells and the loss divides by zero; the cells covered
entirely (`ceil(top/f) : (top+s)//f`) are never empty (s >= R/3 >= 2f - 1 there) and equal
diffusers' region widened by that one cell.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ImpastoError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGES = 10_000  # training images of one concept
MAX_PIXELS = 64 * 1024 * 1024  # per image: PIL's bomb guard would only warn below 2x this


class TrainInputError(ImpastoError):
    """Training input that can never train: a bad image, mask, token or setting; names what is wrong."""


def load_images(images, what: str = "images") -> list[Image.Image]:
    """A folder (its image files, sorted by name), a list of paths, or PIL images -> RGB PIL images.

    Refused, naming the file: a missing folder or file, an unreadable or truncated image, one
    over MAX_PIXELS; an empty folder or list (fewer than 1 image) and more than MAX_IMAGES.
    """
    if images is None:
        raise TrainInputError(f"{what}: none given (a folder, image paths or PIL images)")
    if isinstance(images, (str, os.PathLike)):
        folder = os.fspath(images)
        if not os.path.isdir(folder):
            raise TrainInputError(f"{what}: {folder!r} is not a folder")
        paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                       if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n)))
        if not paths:
            raise TrainInputError(f"{what}: the folder {folder!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})")
        images = paths
    elif isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if not images:
        raise TrainInputError(f"{what}: no image given (at least 1 is needed)")
    if len(images) > MAX_IMAGES:
        raise TrainInputError(f"{what}: {len(images)} images, at most {MAX_IMAGES}")
    return [_open(im, f"{what}[{i}]") for i, im in enumerate(images)]


def _open(item, where: str) -> Image.Image:
    if isinstance(item, Image.Image):
        im, name = item, where
    elif isinstance(item, (str, os.PathLike)):
        name = os.fspath(item)
        if not os.path.isfile(name):
            raise TrainInputError(f"{where}: {name!r} is not a file")
        try:
            with Image.open(name) as f:
                if f.width * f.height > MAX_PIXELS:
                    raise TrainInputError(f"{name}: {f.width}x{f.height} pixels, at most {MAX_PIXELS}")
                f.load()
                im = f.copy()
        except TrainInputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise TrainInputError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    else:
        raise TrainInputError(f"{where}: expected a path or a PIL image, got {type(item).__name__}")
    if im.width < 1 or im.height < 1 or im.width * im.height > MAX_PIXELS:
        raise TrainInputError(f"{name}: {im.width}x{im.height} pixels is not a usable image size")
    return im.convert("RGB")


def load_masks(masks, n: int) -> list[np.ndarray] | None:
    """None, or one mask per image (PIL, array [H, W] or path), as float arrays in [0, 1]."""
    if masks is None:
        return None
    if isinstance(masks, (str, os.PathLike)):
        masks = load_images(masks, "masks")
    masks = list(masks)
    if len(masks) != n:
        raise TrainInputError(f"masks: {len(masks)} masks for {n} images (one per image)")
    out = []
    for i, m in enumerate(masks):
        if isinstance(m, (str, os.PathLike, Image.Image)):
            m = np.asarray(_open(m, f"masks[{i}]").convert("L"), dtype=np.float32) / 255.0
        a = np.asarray(m, dtype=np.float32)
        a = a[..., 0] if a.ndim == 3 else a
        if a.ndim != 2 or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1 or a.max() == 0:
            raise TrainInputError(f"masks[{i}]: expected a 2-D mask with values in [0, 1], not all zero")
        out.append(a)
    return out


def square(im: Image.Image, size: int) -> Image.Image:
    """Center crop to a square, then resize to size x size (bilinear)."""
    s = min(im.size)
    left, top = (im.width - s) // 2, (im.height - s) // 2
    return im.crop((left, top, left + s, top + s)).resize((size, size), Image.BILINEAR)


def square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A [H, W] mask in [0, 1] cropped and resized as `square` does its image: float32 [size, size]."""
    return np.asarray(square(Image.fromarray((mask * 255).astype("uint8")), size), np.float32) / 255.0


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def augment(image: Image.Image, mask: np.ndarray | None, prompt: str, rng: np.random.Generator, *,
            size: int, factor: int, aug: bool = True, hflip: bool = False):
    """Custom Diffusion's augmentation of one instance image (see the module docstring).

    image: size x size RGB; mask: None or float [size, size]; factor: pixels per latent cell.
    Returns (pixels [3, size, size] in [-1, 1], loss mask [size/f, size/f], prompt).
    """
    m = size // factor
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = None if mask is None else mask[:, ::-1]
    scale = size
    if aug:
        scale = int(rng.integers(size // 3, size + 1)) if rng.random() < 0.66 else \
            int(rng.integers(int(1.2 * size), int(1.4 * size)))
    outer, inner = (scale, size) if scale > size else (size, scale)
    top, left = int(rng.integers(0, outer - inner + 1)), int(rng.integers(0, outer - inner + 1))
    pixels = np.asarray(image.resize((scale, scale), Image.BILINEAR), dtype=np.float32) / 127.5 - 1.0
    user = None if mask is None else np.asarray(Image.fromarray(np.ascontiguousarray(mask)).resize(
        (scale, scale), Image.BILINEAR), dtype=np.float32)
    canvas = np.zeros((size, size, 3), np.float32)
    valid = np.zeros((m, m), np.float32)
    full_user = np.zeros((size, size), np.float32)
    if scale > size:
        canvas = pixels[top:top + size, left:left + size]
        valid[:] = 1.0
        if user is not None:
            full_user = user[top:top + size, left:left + size]
    else:
        canvas[top:top + scale, left:left + scale] = pixels
        valid[-(-top // factor):(top + scale) // factor, -(-left // factor):(left + scale) // factor] = 1.0
        if user is not None:
            full_user[top:top + scale, left:left + scale] = user
    if user is not None:
        valid = valid * full_user.reshape(m, factor, m, factor).mean((1, 3))
    if scale < 0.6 * size:
        prompt = str(rng.choice(["a far away ", "very small "])) + prompt
    elif scale > size:
        prompt = str(rng.choice(["zoomed in ", "close up "])) + prompt
    return torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1), torch.from_numpy(valid), prompt
