"""The public request/response types: Request, Adapter, Guidance, GenerationOutput, AdapterInfo."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from .errors import RequestError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass(frozen=True)
class Adapter:
    """One adapter named by a request: `Adapter("corgi", scale=0.8)` or with family options
    (Perfusion: `Adapter("teddy", beta=0.7, tau=0.02, global_lock=False)`).

    `start`, `end`: the part of the schedule the adapter is active in, as fractions: step i of
    n is active iff start <= i / n < end (`Adapter("detail", 0.8, start=0.5)`: the second half
    only). UNet LoRAs and `kv` adapters only; the others act once before the first step.
    """

    name: str
    scale: float = 1.0
    options: dict = field(default_factory=dict)
    start: float = 0.0
    end: float = 1.0

    def __init__(self, name: str, scale: float = 1.0, *, start: float = 0.0, end: float = 1.0, **options: Any):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "options", dict(options))
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def scheduled(self) -> bool:
        """Whether the adapter is active over only part of the schedule."""
        return (self.start, self.end) != (0.0, 1.0)

    def active(self, i: int, n: int) -> bool:
        """Whether the adapter acts in step i of n."""
        return self.start <= i / n < self.end


@dataclass(frozen=True)
class Guidance:
    """Guidance of one request.

    `cfg` is the classifier-free guidance scale (no uncond branch when cfg <= 1, as diffusers);
    `styles` maps style-adapter names to their guidance weights (Pair Customization), or to
    `Adapter(name, weight, start=, end=)` for a style active over part of the schedule;
    `rescale` is diffusers' `guidance_rescale` (arXiv 2305.08891 §3.4), against the cond branch.
    """

    cfg: float = 7.5
    styles: dict = field(default_factory=dict)
    rescale: float = 0.0


AdapterSpec = Union[str, tuple, Adapter]


@dataclass
class Request:
    """One generation request; fields and defaults are exactly `Engine.generate`'s keywords."""

    prompt: str
    adapters: tuple = ()
    guidance: Union[float, Guidance] = 7.5
    negative_prompt: str | None = None
    steps: int = 30
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    output_type: str = "pil"
    timeout: float | None = None  # seconds from submit; past it the request ends with RequestTimeoutError
    scheduler: str | None = None  # A1111 sampler or diffusers class name (engine/schedulers.py); None: the model's
    seeds: list | None = None  # one seed per image (diffusers' generator list); overrides `seed`
    image: Any = None  # img2img: the init image (PIL, HxWx3 array in [0, 1], or [3, H, W] tensor in [-1, 1])
    strength: float | None = None  # how much of the schedule the image is noised through, (0, 1]; None: 0.8, inpainting 1.0
    init_image: Any = None  # alias of `image` (older diffusers / A1111 name)
    mask_image: Any = None  # inpainting: white (1) = repaint; PIL, HxW array or [H, W] tensor in [0, 1]; needs `image`
    clip_skip: int | None = None  # A1111's "Clip skip": 1 = last layer, 2 = penultimate (diffusers clip_skip=1)
    prompt_syntax: str | None = None  # "plain" or "a1111" (weights, BREAK, <lora:NAME:W>); None: the engine's
    callback: Any = None  # callback(step, total, preview) after every step, on the worker thread
    preview: bool = False  # pass the callback a cheap RGB preview (latent -> RGB, [n, h, w, 3] in [0, 1])
    ip_adapter_image: Any = None  # reference image(s) for an encoder adapter: PIL, encoded bytes, or a list of them


@dataclass
class GenerationOutput:
    """The result of one request.

    `images`: a list of PIL images ("pil"), a float numpy array N×H×W×3 in [0, 1] ("np"), or the
    final latents [N, C, h, w] ("latent"); None when the request failed.
    `timings`: seconds spent queued (submit to admission), in plan, denoise (admission to the
    last step; forwards are shared with the other requests in flight), decode, and total.
    `error`: None, or the exception that failed this request.
    `seed`: the seed actually used (drawn at random when the request gave none).
    `seeds`: the seed of each image (image i is what `seeds=[seeds[i]]` alone would make).
    `warnings`: what the engine changed in the request, e.g. a prompt cut to the token limit.
    """

    images: Any = None
    timings: dict = field(default_factory=dict)
    error: BaseException | None = None
    seed: int | None = None
    warnings: list = field(default_factory=list)
    seeds: list | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """What the store knows about a registered adapter, from its file header only."""

    name: str
    path: str
    family: str
    format: str
    rank: int
    targets: tuple
    nbytes: int
    token: str | None = None
    suffix: str | None = None
    fingerprint: str | None = None
    token_map: tuple = ()  # ((placeholder in prompts, placeholder in the file), ...)
    image_tokens: int = 0  # encoder adapters: tokens per reference image
    image_encoder: str | None = None  # encoder adapters: the image-encoder folder


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _finite(x) -> bool:
    return _is_number(x) and math.isfinite(x)


def normalize_adapters(adapters) -> list[Adapter]:
    """Turn `"name"`, `("name", scale)`, `Adapter(...)` entries, or a dict name -> scale, into
    Adapters, or RequestError naming the bad entry."""
    if isinstance(adapters, (str, Adapter)):
        adapters = [adapters]
    elif isinstance(adapters, dict):
        adapters = list(adapters.items())  # name -> scale, never silently scale 1
    elif adapters is not None and not isinstance(adapters, (list, tuple)):
        raise RequestError(f"adapters: expected a list, a dict name -> scale or one name, got {type(adapters).__name__}")
    out = []
    for i, spec in enumerate(adapters or ()):
        if isinstance(spec, Adapter):
            a = spec
        elif isinstance(spec, str):
            a = Adapter(spec)
        elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
            if not _is_number(spec[1]):
                raise RequestError(f"adapters[{i}] ({spec[0]}): scale must be a number, got {spec[1]!r}")
            a = Adapter(spec[0], float(spec[1]))
        else:
            raise RequestError(f"adapters[{i}]: expected 'name', ('name', scale) or Adapter, got {spec!r}")
        if not isinstance(a.name, str) or not ADAPTER_NAME.match(a.name):
            raise RequestError(f"adapters[{i}]: adapter name {a.name!r} must be a string matching [A-Za-z0-9._-]+")
        if not _finite(a.scale):
            raise RequestError(f"adapters[{i}] ({a.name}): scale must be a finite number, got {a.scale!r}")
        if not (_finite(a.start) and _finite(a.end) and 0.0 <= a.start < a.end <= 1.0):
            raise RequestError(f"adapters[{i}] ({a.name}): start and end must be fractions of the schedule with "
                               f"0 <= start < end <= 1, got start={a.start!r}, end={a.end!r}")
        out.append(a)
    return out


def normalize_guidance(guidance) -> Guidance:
    if isinstance(guidance, Guidance):
        g = guidance
    elif _is_number(guidance):
        g = Guidance(cfg=float(guidance))
    else:
        raise RequestError(f"guidance: expected a float or impasto.Guidance, got {guidance!r}")
    for field_name, value in (("guidance.cfg", g.cfg), ("guidance.rescale", g.rescale)):
        if not _finite(value):
            raise RequestError(f"{field_name}: must be a finite number, got {value!r}")
    if not 0.0 <= g.rescale <= 1.0:
        raise RequestError(f"guidance.rescale: must be in [0, 1], got {g.rescale}")
    if not isinstance(g.styles, dict):
        raise RequestError(f"guidance.styles: expected a dict style name -> weight, got {g.styles!r}")
    for name, weight in g.styles.items():
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise RequestError(f"guidance.styles: style name {name!r} must be a string matching [A-Za-z0-9._-]+")
        if not _finite(weight):
            raise RequestError(f"guidance.styles[{name!r}]: weight must be a finite number, got {weight!r}")
    return g


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def validate_request(req: Request) -> None:
    """Check the plain fields of a request; raise RequestError naming the bad field."""
    if not isinstance(req.prompt, str):
        raise RequestError(f"prompt: expected a string, got {type(req.prompt).__name__}")
    if req.negative_prompt is not None and not isinstance(req.negative_prompt, str):
        raise RequestError(f"negative_prompt: expected a string or None, got {type(req.negative_prompt).__name__}")
    if not _positive_int(req.steps):
        raise RequestError(f"steps: expected a positive integer, got {req.steps!r}")
    if not _positive_int(req.num_images):
        raise RequestError(f"num_images: expected a positive integer, got {req.num_images!r}")
    if req.seed is not None and (not isinstance(req.seed, int) or isinstance(req.seed, bool)
                                 or not 0 <= req.seed < 2**64):
        raise RequestError(f"seed: expected an integer in [0, 2**64) or None, got {req.seed!r}")
    if req.output_type not in OUTPUT_TYPES:
        raise RequestError(f"output_type: expected one of {OUTPUT_TYPES}, got {req.output_type!r}")
    for name in ("height", "width"):
        v = getattr(req, name)
        if v is not None and not _positive_int(v):
            raise RequestError(f"{name}: expected a positive integer or None, got {v!r}")
    if req.timeout is not None and not (_finite(req.timeout) and req.timeout > 0):
        raise RequestError(f"timeout: expected a positive number of seconds or None, got {req.timeout!r}")
    validate_usage(req)


PROMPT_SYNTAXES = ("plain", "a1111")


def _seed_ok(s) -> bool:
    return isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**64


def validate_usage(req: Request) -> None:
    """Check the sampler, seeds, init image, clip skip, syntax and callback fields."""
    from .schedulers import resolve

    if req.scheduler is not None:
        resolve(req.scheduler)
    if req.seeds is not None:
        if not isinstance(req.seeds, (list, tuple)) or not all(_seed_ok(s) for s in req.seeds):
            raise RequestError(f"seeds: expected a list of integers in [0, 2**64), got {req.seeds!r}")
        if len(req.seeds) != req.num_images:
            raise RequestError(f"seeds: {len(req.seeds)} seeds for num_images={req.num_images}; give one per image")
    if req.image is not None and req.init_image is not None:
        raise RequestError("image and init_image: give one (init_image is an alias of image)")
    if req.mask_image is not None and req.image is None and req.init_image is None:
        raise RequestError("mask_image: inpainting needs the image to repaint; give image= as well")
    if req.strength is not None and not (_finite(req.strength) and 0.0 < req.strength <= 1.0):
        raise RequestError(f"strength: expected a number in (0, 1], got {req.strength!r}")
    if req.clip_skip is not None and not _positive_int(req.clip_skip):
        raise RequestError(f"clip_skip: expected a positive integer (1 = the last layer) or None, got {req.clip_skip!r}")
    if req.prompt_syntax is not None and req.prompt_syntax not in PROMPT_SYNTAXES:
        raise RequestError(f"prompt_syntax: expected one of {PROMPT_SYNTAXES} or None, got {req.prompt_syntax!r}")
    if req.callback is not None and not callable(req.callback):
        raise RequestError(f"callback: expected a callable (step, total, preview) or None, got {req.callback!r}")
    if not isinstance(req.preview, bool):
        raise RequestError(f"preview: expected True or False, got {req.preview!r}")


MAX_REFERENCE_IMAGES = 8  # images in one request's ip_adapter_image


class ReferenceImages:
    """A request's `ip_adapter_image`, decoded: RGB PIL images, equal and hashed by content, so
    requests with the same reference share its planning."""

    def __init__(self, images):
        import hashlib

        self.images = tuple(images)
        h = hashlib.sha256()
        for im in self.images:
            h.update(repr(im.size).encode())
            h.update(im.tobytes())
        self.digest = h.hexdigest()

    def __len__(self) -> int:
        return len(self.images)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __eq__(self, other) -> bool:
        return isinstance(other, ReferenceImages) and other.digest == self.digest

    def __repr__(self) -> str:
        return f"ReferenceImages({len(self.images)} images, {self.digest[:12]})"


def normalize_images(value, *, max_pixels: int) -> ReferenceImages | None:
    """`ip_adapter_image` as ReferenceImages (None when absent): a PIL image or encoded image
    bytes (PNG, JPEG, ...), or a non-empty list of them; RequestError naming the bad entry."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise RequestError("ip_adapter_image: an empty list; give an image or leave it None")
    if len(items) > MAX_REFERENCE_IMAGES:
        raise RequestError(f"ip_adapter_image: {len(items)} images, at most {MAX_REFERENCE_IMAGES}")
    return ReferenceImages(_decode_image(x, i if len(items) > 1 else None, max_pixels) for i, x in enumerate(items))


def _decode_image(x, index, max_pixels: int):
    import io
    import warnings

    from PIL import Image

    where = "ip_adapter_image" + (f"[{index}]" if index is not None else "")
    if isinstance(x, (bytes, bytearray, memoryview)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                x = Image.open(io.BytesIO(bytes(x)))
        except Exception as e:  # noqa: BLE001 - whatever PIL says about the bytes
            raise RequestError(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    if not isinstance(x, Image.Image):
        raise RequestError(f"{where}: expected a PIL image or encoded image bytes, got {type(x).__name__}")
    w, h = x.size
    if not (w > 0 and h > 0 and w * h <= max_pixels):
        raise RequestError(f"{where}: {w}x{h} pixels, max_pixels is {max_pixels}")
    try:
        return x.convert("RGB")  # decodes now: corrupt data fails here, on the caller's thread
    except Exception as e:  # noqa: BLE001
        raise RequestError(f"{where}: the image cannot be decoded ({type(e).__name__}: {e})") from None
