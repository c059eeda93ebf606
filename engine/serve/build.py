"""From a request body (OpenAI or A1111) to the list of images the engine makes, and back from
the engine's outputs to the response bodies. One path for every endpoint, so that the same
parameters make the same image whichever API a client speaks.
"""

from __future__ import annotations

import base64
import json
import random
import time

from ..errors import RequestError
from .a1111 import NotSupportedError, parse_prompt, png_bytes, sampler_for
from .tasks import Image

SEED_RANGE = 2**32  # A1111 draws random seeds below 2**32 too


def random_seed() -> int:
    return random.SystemRandom().randrange(SEED_RANGE)


def parse_size(size: str | None, default: tuple) -> tuple[int, int]:
    """'WxH' -> (W, H); None or 'auto' -> the model's native size."""
    if size is None or size == "auto":
        return default
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise RequestError(f"size: expected 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}")
    return int(w), int(h)


def decode_images(value, field: str) -> tuple:
    """A base64 string or a list of them (a `data:image/...;base64,` prefix allowed) -> the encoded
    images' bytes; RequestError naming the entry that is not base64. What the bytes hold is
    checked by the engine (api.reference_images)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for i, item in enumerate(items):
        where = field if isinstance(value, str) else f"{field}[{i}]"
        head, sep, rest = item.partition(",")
        data = rest if sep and head.startswith("data:") else item
        try:
            out.append(base64.b64decode(data, validate=True))
        except (ValueError, TypeError):
            raise RequestError(f"{where}: not base64-encoded image bytes") from None
    return tuple(out)


def _images(prompts, negatives, *, seed, steps, cfg, width, height, adapters=(), styles=(), timeout=None,
            limits, ip_adapter_image=(), **usage) -> list[Image]:
    """One Image per prompt: `<lora:...>` tags parsed out of each prompt on its own (not A1111's
    first-prompt-wins), image i using seed + i."""
    if len(prompts) > limits["max_num_images"]:
        raise RequestError(f"n: {len(prompts)} images, max_num_images is {limits['max_num_images']}")
    images = []
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        parsed = parse_prompt(prompt)
        images.append(Image(prompt=parsed.prompt, negative_prompt=negative or None, steps=steps, cfg=cfg,
                            seed=seed + i, width=width, height=height,
                            adapters=tuple(adapters) + parsed.adapters, styles=tuple(styles), timeout=timeout,
                            ip_adapter_image=ip_adapter_image, **usage))
    return images


def openai_images(body, backend) -> list[Image]:
    """The images of a `POST /v1/images/generations` (or `/v1/jobs`) body."""
    if body.image is not None:
        raise NotSupportedError("image: init images (img2img) are not supported here; an encoder adapter's "
                                "reference goes in ip_adapter_image")
    if body.response_format != "b64_json":
        raise NotSupportedError(f"response_format: {body.response_format!r} is not supported; use 'b64_json'")
    if body.output_format not in (None, "png"):
        raise NotSupportedError(f"output_format: {body.output_format!r} is not supported; images are PNG")
    if body.adapters is not None and body.loras is not None:
        raise RequestError("adapters and loras: give one of them (loras is another name for adapters)")
    refs = body.adapters if body.adapters is not None else body.loras or []
    for ref in refs:
        if ref.start is not None or ref.end is not None:
            raise NotSupportedError(f"adapters: {ref.name!r}: start/end (step-scheduled adapters) are not "
                                    f"supported yet")
    width, height = parse_size(body.size, backend.default_size)
    seed = body.seed if body.seed is not None else random_seed()
    return _images([body.prompt] * body.n, [body.negative_prompt] * body.n, seed=seed,
                   steps=body.num_inference_steps, cfg=body.guidance_scale, width=width, height=height,
                   adapters=[(r.name, r.scale) for r in refs], styles=[(s.name, s.weight) for s in body.styles or []],
                   timeout=body.timeout, limits=backend.limits,
                   ip_adapter_image=decode_images(body.ip_adapter_image, "ip_adapter_image"))


def _per_image(value, total: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * total
    if len(value) != total:
        raise RequestError(f"{name}: a list must hold one prompt per image ({total}), got {len(value)}")
    return list(value)


def a1111_images(body, backend) -> list[Image]:
    """The images of a `POST /sdapi/v1/txt2img` body: batch_size x n_iter images, seed + i, each
    with the body's sampler and schedule type, A1111 prompt weights and clip skip."""
    sampler = sampler_for(body.sampler_name or body.sampler_index, body.scheduler)
    clip_skip = (body.override_settings or {}).get("CLIP_stop_at_last_layers")
    if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 1):
        raise RequestError(f"override_settings.CLIP_stop_at_last_layers: expected a positive integer, got {clip_skip!r}")
    for field, on in (("enable_hr", body.enable_hr), ("subseed_strength", body.subseed_strength != 0),
                      ("restore_faces", body.restore_faces), ("tiling", body.tiling)):
        if on:
            raise NotSupportedError(f"{field}: not supported")
    total = body.batch_size * body.n_iter
    default_w, default_h = backend.default_size
    seed = body.seed if body.seed != -1 else random_seed()
    return _images(_per_image(body.prompt, total, "prompt"), _per_image(body.negative_prompt, total, "negative_prompt"),
                   seed=seed, steps=body.steps, cfg=body.cfg_scale, width=body.width or default_w,
                   height=body.height or default_h, limits=backend.limits, sampler=sampler, syntax="a1111",
                   clip_skip=clip_skip)


def submit_all(backend, images: list[Image]) -> list:
    """Submit every image, or none: if one is refused, the ones already queued are cancelled and
    the refusal is raised (a call either runs whole or fails at once)."""
    jobs = []
    try:
        for image in images:
            jobs.append(backend.submit(image.request()))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def encode(task, backend) -> list[str]:
    """The task's images as base64 PNGs, each with its `parameters` chunk; raises the first
    image's error if any failed."""
    err = task.error()
    if err is not None:
        raise err
    return [base64.b64encode(png_bytes(out.images[0], image.infotext(backend.model_name, backend.sampler))).decode()
            for image, out in zip(task.images, task.outputs())]


def openai_response(task, pngs: list[str]) -> dict:
    return {"created": int(task.created), "data": [{"b64_json": b, "seed": image.seed}
                                                   for b, image in zip(pngs, task.images)]}


def a1111_response(body, task, pngs: list[str], backend) -> dict:
    """A1111's `{images, parameters, info}`; `info` is a JSON string, as A1111 sends it."""
    images = task.images
    prompts = _per_image(body.prompt, len(images), "prompt")
    negatives = _per_image(body.negative_prompt, len(images), "negative_prompt")
    info = {
        "prompt": prompts[0], "all_prompts": prompts,
        "negative_prompt": negatives[0], "all_negative_prompts": negatives,
        "seed": images[0].seed, "all_seeds": [im.seed for im in images],
        "subseed": -1, "all_subseeds": [-1] * len(images), "subseed_strength": 0,
        "width": images[0].width, "height": images[0].height, "sampler_name": images[0].sampler or backend.sampler,
        "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "sd_model_name": backend.model_name, "sd_model_hash": None, "index_of_first_image": 0,
        "infotexts": [im.infotext(backend.model_name, backend.sampler) for im in images],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(task.created)),
    }
    return {"images": pngs if body.send_images else [], "parameters": body.model_dump(), "info": json.dumps(info)}
