"""The `impasto` command line: `impasto generate "a red star on a blue background" -o star.png`,
`impasto serve --model tiny --adapters loras/`."""

from __future__ import annotations

import argparse
import sys
import warnings


def _parse_adapter(text: str):
    """NAME, NAME=SCALE."""
    name, _, scale = text.partition("=")
    return (name, float(scale)) if scale else name


def _generate(args) -> int:
    import impasto
    from impasto import tiny
    from impasto.serve.a1111 import infotext, parse_prompt, sampler_name, save_png

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = impasto.Engine.from_pretrained(args.model, scheduler=args.scheduler, progress=not args.quiet)
    for w in caught:
        if str(w.message) == tiny.RANDOM_WARNING:
            print(tiny.RANDOM_WARNING, file=sys.stderr)
    from impasto.adapters.families import FAMILIES, detect_family

    for spec in args.register or ():
        name, _, path = spec.partition("=")
        reads_images = args.image_encoder and FAMILIES[detect_family(path)].image_input
        engine.adapters.register(name, path, **({"image_encoder": args.image_encoder} if reads_images else {}))
    # reference images for an encoder adapter, as encoded bytes: the engine decodes and checks them
    ip_images = [_read_bytes(p) for p in args.ip_adapter_image or ()] or None
    parsed = parse_prompt(args.prompt)  # <lora:NAME:W> in the prompt, as A1111 and `impasto serve` read it
    adapters = [_parse_adapter(a) for a in args.adapter or ()] + list(parsed.adapters)
    out = engine.generate(
        parsed.prompt,
        adapters=adapters,
        guidance=args.guidance,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_images=args.grid or args.num_images,
        ip_adapter_image=ip_images,
    )
    images = out.images
    if args.grid:
        images = [_contact_sheet(images)]
    paths = [args.output] if len(images) == 1 else [_numbered(args.output, i) for i in range(len(images))]
    size = out.images[0].size
    parameters = infotext(prompt=parsed.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                          sampler=sampler_name(type(engine.base.scheduler).__name__), cfg_scale=args.guidance,
                          seed=out.seed, width=size[0], height=size[1], model=_model_name(args.model),
                          adapters=[(a, 1.0) if isinstance(a, str) else a for a in adapters])
    for image, path in zip(images, paths):
        if path.lower().endswith(".png"):
            save_png(image, path, parameters)  # the A1111 `parameters` chunk: PNG Info reads it
        else:
            image.save(path)
    t = out.timings
    print(
        f"wrote {', '.join(paths)} (seed {out.seed}; plan {t['plan']:.2f}s, denoise {t['denoise']:.2f}s, "
        f"decode {t['decode']:.2f}s, total {t['total']:.2f}s)"
    )
    return 0


def _read_bytes(path: str) -> bytes:
    import impasto

    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise impasto.RequestError(f"--ip-adapter-image {path}: {e.strerror or e}") from None


def _model_name(model: str) -> str:
    import os

    return os.path.basename(os.path.normpath(model))


def _serve(args) -> int:
    if args.ray:
        from impasto.serve.ray.server import run
    else:
        from impasto.serve.server import run

    return run(args)


def _covariance(args) -> int:
    """C⁻¹ of a base model's text encodings (Perfusion), stored under the adapter root by the
    base model's fingerprint; never written into the model folder."""
    import impasto

    with open(args.captions, encoding="utf-8") as f:
        captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise impasto.RequestError(f"{args.captions}: no captions")
    engine = impasto.Engine.from_pretrained(args.model, adapter_root=args.adapter_root)
    path = engine.adapters.compute_covariance(engine.base.tokenizer, engine.base.text_encoder, captions)
    print(f"wrote {path} ({len(captions)} captions, base fingerprint {engine.adapters.fingerprint})")
    return 0


def _numbered(path: str, i: int) -> str:
    stem, dot, ext = path.rpartition(".")
    return f"{stem}-{i}.{ext}" if dot else f"{path}-{i}"


def _contact_sheet(images):
    from PIL import Image

    n = len(images)
    cols = int(n**0.5 + 0.999)
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    zoom = max(1, 256 // max(sheet.size))  # tiny images: enlarge so a person can look at them
    return sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.NEAREST) if zoom > 1 else sheet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="impasto", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images for one prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="image path (numbered when several)")
    g.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    g.add_argument("--scheduler", default=None, help='a diffusers scheduler class, e.g. "DPMSolverMultistepScheduler"')
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--grid", type=int, default=None, help="make N images and write one contact sheet")
    g.add_argument("--register", action="append", metavar="NAME=PATH", help="register an adapter file")
    g.add_argument("--adapter", action="append", metavar="NAME[=SCALE]", help="apply a registered adapter")
    g.add_argument("--ip-adapter-image", action="append", metavar="PATH",
                   help="a reference image for the request's encoder (IP-Adapter) adapter; repeat for several")
    g.add_argument("--image-encoder", default=None, metavar="FOLDER",
                   help="CLIPVisionModelWithProjection folder of encoder adapters given to --register "
                        "(default: the model folder's image_encoder/)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_generate)
    s = sub.add_parser("serve", help="serve the OpenAI- and A1111-compatible HTTP API over one engine")
    s.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    s.add_argument("--adapters", required=True, metavar="DIR",
                   help="the adapter root: every adapter in it is registered; uploads are written there")
    s.add_argument("--host", default="127.0.0.1", help="beyond loopback only with --api-key-file")
    s.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    s.add_argument("--api-key-file", default=None, help="bearer API keys, one per line")
    s.add_argument("--admin-key-file", default=None, help="keys that may upload and delete adapters")
    s.add_argument("--grace-seconds", type=float, default=30.0, help="on SIGTERM, time for in-flight work")
    s.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="JSON body limit (413 above)")
    s.add_argument("--max-upload-bytes", type=int, default=512 * 2**20, help="adapter upload limit (413 above)")
    s.add_argument("--limit", action="append", metavar="NAME=N",
                   help="an engine operator limit, e.g. max_queue=64 (impasto.LIMITS)")
    s.add_argument("--ray", action="store_true", help="run on Ray Serve (RAY_ADDRESS's cluster, else a local one)")
    s.add_argument("--replicas", type=int, default=2, help="with --ray: replicas, each with its own engine")
    s.set_defaults(func=_serve)
    c = sub.add_parser("covariance", help="compute a base model's text-encoding C⁻¹ for Perfusion (rank1)")
    c.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    c.add_argument("--captions", required=True, help="a text file, one caption per line")
    c.add_argument("--adapter-root", default=None, help="where engine state lives (default: the user cache)")
    c.set_defaults(func=_covariance)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # noqa: BLE001 - the CLI reports impasto errors in one line
        import impasto

        from impasto.serve.auth import ConfigError

        if isinstance(e, (impasto.ImpastoError, ConfigError)):
            print(f"impasto: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
