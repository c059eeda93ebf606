"""AUTOMATIC1111 conventions shared by the server and the CLI: the `<lora:NAME:W>` prompt syntax
and the `parameters` text chunk ("infotext") that A1111 writes into its PNGs.

Pure Python (re, json, Pillow): the CLI imports it without the server's dependencies.
"""

from __future__ import annotations

import io
import json

from ..prompts import EXTRA_NETWORK, LORA_KINDS, NotSupportedError, PromptAdapters  # noqa: F401 - re-exported
from ..prompts import parse_lora_tags as parse_prompt  # noqa: F401 - the one parser: engine, CLI and server


def lora_tags(adapters) -> str:
    """The `<lora:NAME:W>` tags that put `adapters` ((name, scale) pairs) back into a prompt."""
    return " ".join(f"<lora:{name}:{_number(scale)}>" for name, scale in adapters)


def _number(x: float) -> str:
    """1.0 -> "1", 0.75 -> "0.75": short, and exact enough to reproduce the request."""
    return f"{float(x):g}" if abs(float(x)) >= 1e-4 or x == 0 else repr(float(x))


def _quote(value) -> str:
    """A1111's infotext quoting: a value holding `,`, `:` or a newline is written as JSON."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(
    *,
    prompt: str,
    negative_prompt: str | None,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    adapters=(),
    styles=None,
    extra=None,
) -> str:
    """The A1111 `parameters` text of one image.

    Semantics (A1111's `create_infotext`):
      line 1: the prompt, with the image's adapters as `<lora:NAME:W>` tags (pasting it into
              A1111 or back into this server reproduces the adapters);
      line 2: "Negative prompt: ..." when there is one;
      last:   "Steps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: tiny"
              plus "Style guidance: NAME: W, ..." for Pair Customization styles.
    """
    tags = lora_tags(adapters)
    lines = [f"{prompt} {tags}".strip() if tags else prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    params = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": _number(cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    params.update(extra or {})  # e.g. "Clip skip": 2, "Denoising strength": 0.6 (A1111's names)
    if styles:
        params["Style guidance"] = ", ".join(f"{n}: {_number(w)}" for n, w in styles.items())
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in params.items()))
    return "\n".join(lines)


def png_bytes(image, parameters: str) -> bytes:
    """`image` (PIL) as PNG bytes carrying `parameters` in a `parameters` tEXt chunk, as A1111
    writes it (readers: A1111's "PNG Info", `PIL.Image.open(f).info["parameters"]`)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_parameters(path) -> str | None:
    """The `parameters` text of the PNG at `path` (None when it has none); a file that is not an
    image is a RequestError naming it."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import RequestError

    try:
        with Image.open(path) as im:
            return im.info.get("parameters")
    except (OSError, UnidentifiedImageError) as e:
        raise RequestError(f"{path}: not a readable image ({e})") from None


def save_png(image, path, parameters: str) -> None:
    """Write `image` to `path` as PNG with its `parameters` chunk (the CLI's writer)."""
    with open(path, "wb") as f:
        f.write(png_bytes(image, parameters))


# diffusers scheduler class -> the A1111 sampler of the same algorithm (A1111's own names).
SAMPLERS = {
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "LMSDiscreteScheduler": "LMS",
    "HeunDiscreteScheduler": "Heun",
    "UniPCMultistepScheduler": "UniPC",
    "DDPMScheduler": "DDPM",
}


# A1111's "Schedule type" (1.9+), sent beside the sampler: "Automatic" keeps the sampler's own
# sigmas, "Karras" picks the sampler's Karras variant of the one table (engine/schedulers.py).
SCHEDULE_TYPES = ("Automatic", "Karras")


def sampler_for(sampler: str | None, schedule: str | None = None) -> str | None:
    """Semantics: A1111's (sampler_name, scheduler) fields -> the A1111 sampler name the engine
    serves (engine/schedulers.py's table), or None for the model's own sampler.
      ("DPM++ 2M", "Karras") -> "DPM++ 2M Karras";  ("euler a", None) -> "Euler a";
      ("DPM++ 2M Karras", "Automatic") -> "DPM++ 2M Karras" (A1111 < 1.9 names the schedule in the sampler)
    An unknown sampler is a RequestError listing the names; a schedule other than Automatic /
    Karras, or a Karras variant diffusers lacks, is a NotSupportedError."""
    from .. import schedulers

    schedule = (schedule or "Automatic").strip()
    if schedule.lower() not in {s.lower() for s in SCHEDULE_TYPES}:
        raise NotSupportedError(f"scheduler: {schedule!r} is not supported (schedule types: "
                                f"{', '.join(SCHEDULE_TYPES)})")
    if not sampler:
        if schedule.lower() != "automatic":
            raise NotSupportedError(f"scheduler: {schedule!r} needs a sampler_name")
        return None
    name = sampler.strip()
    by_lower = {k.lower(): k for k in schedulers.A1111}
    if schedule.lower() == "karras" and not name.lower().endswith(" karras"):
        schedulers.resolve(name)  # an unknown sampler is named first
        if name.lower() + " karras" not in by_lower:
            raise NotSupportedError(f"scheduler: 'Karras' with sampler {name!r}: no Karras variant of it "
                                    f"(those with one: {', '.join(k for k in schedulers.A1111 if k.endswith(' Karras'))})")
        name += " Karras"
    schedulers.resolve(name)
    return by_lower.get(name.lower(), name)


def sampler_name(scheduler_class: str) -> str:
    """The A1111 name of the diffusers scheduler class `scheduler_class` (its class name if A1111
    has none)."""
    return SAMPLERS.get(scheduler_class, scheduler_class)
