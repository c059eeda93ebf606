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


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DTYPES = ("float32", "float16", "bfloat16")


def _check_output(path: str, n: int) -> None:
    """Refuse an output path that cannot be written, before any image is made."""
    import os

    from impasto import RequestError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        raise RequestError(f"-o {path}: expected an image file name ending in one of {', '.join(IMAGE_EXTENSIONS)}")
    if not os.path.isdir(folder):
        raise RequestError(f"-o {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise RequestError(f"-o {path}: the folder {folder} is not writable")
    if os.path.isdir(path):
        raise RequestError(f"-o {path}: is a folder; give an image file name")


def _quiet_libraries() -> None:
    """transformers' "Loading weights" bars and diffusers' notices, off unless --verbose."""
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _pairs(specs, what: str, convert=str) -> dict:
    from impasto import RequestError

    out = {}
    for spec in specs or ():
        name, eq, value = spec.partition("=")
        if not eq or not name:
            raise RequestError(f"{what} {spec!r}: expected NAME=VALUE")
        try:
            out[name] = convert(value)
        except ValueError:
            raise RequestError(f"{what} {spec!r}: {value!r} is not a number") from None
    return out


def _generate(args) -> int:
    import torch

    import impasto
    from impasto import tiny
    from impasto.prompts import parse_lora_tags
    from impasto.serve.a1111 import infotext, save_png

    n = args.grid or args.num_images
    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",")]
        except ValueError:
            raise impasto.RequestError(f"--seeds {args.seeds!r}: expected integers separated by commas") from None
        n = len(seeds) if not (args.grid or args.num_images != 1) else n
    _check_output(args.output, n)
    if not args.verbose:
        _quiet_libraries()
    init_image = None
    if args.init_image:
        from PIL import Image, UnidentifiedImageError

        try:
            init_image = Image.open(args.init_image).convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise impasto.RequestError(f"--init-image {args.init_image}: not a readable image ({e})") from None
    mask_image = None
    if args.mask:
        if not args.init_image:
            raise impasto.RequestError("--mask: inpainting needs --init-image (the image to repaint)")
        from PIL import Image, UnidentifiedImageError

        try:
            mask_image = Image.open(args.mask).convert("L")
        except (OSError, UnidentifiedImageError) as e:
            raise impasto.RequestError(f"--mask {args.mask}: not a readable image ({e})") from None
    tokens = _pairs(args.token, "--token")
    styles = _pairs(args.style, "--style", float)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = impasto.Engine.from_pretrained(args.model, progress=not args.quiet, device=args.device,
                                                dtype=getattr(torch, args.dtype) if args.dtype else None,
                                                config=args.config)
    for w in caught:
        if str(w.message) == tiny.RANDOM_WARNING:
            print(tiny.RANDOM_WARNING, file=sys.stderr)
    from impasto.adapters.families import FAMILIES, detect_family

    if args.register_dir:
        for path, err in engine.adapters.register_dir(args.register_dir).items():
            print(f"impasto: skipped {path}: {err}", file=sys.stderr)
    for spec in args.register or ():
        name, _, path = spec.partition("=")
        reads_images = args.image_encoder and FAMILIES[detect_family(path)].image_input
        kw = {"image_encoder": args.image_encoder} if reads_images else {}
        if name in tokens:
            kw["token"] = tokens[name]
        engine.adapters.register(name, path, **kw)
    # reference images for an encoder adapter, as encoded bytes: the engine decodes and checks them
    ip_images = [_read_bytes(p) for p in args.ip_adapter_image or ()] or None
    adapters = [_parse_adapter(a) for a in args.adapter or ()]
    guidance = impasto.Guidance(cfg=args.guidance, styles=styles) if styles else args.guidance
    out = engine.generate(
        args.prompt,
        adapters=adapters,
        guidance=guidance,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        seed=args.seed,
        seeds=seeds,
        height=args.height,
        width=args.width,
        num_images=n,
        scheduler=args.scheduler,
        image=init_image,
        mask_image=mask_image,
        strength=args.strength,
        clip_skip=args.clip_skip,
        prompt_syntax=args.prompt_syntax,
        ip_adapter_image=ip_images,
    )
    images = out.images
    if args.grid:
        images = [_contact_sheet(images)]
    paths = [args.output] if len(images) == 1 else [_numbered(args.output, i) for i in range(len(images))]
    size = out.images[0].size
    parsed = parse_lora_tags(args.prompt) if args.prompt_syntax == "a1111" else None
    from impasto import schedulers

    sampler = schedulers.a1111_name(schedulers.build(args.scheduler, engine.base.scheduler.config,
                                                     engine.base.scheduler))
    for i, (image, path) in enumerate(zip(images, paths)):
        extra = {}
        if args.clip_skip and args.clip_skip > 1:
            extra["Clip skip"] = args.clip_skip
        if init_image is not None:  # the engine's default: 0.8, or 1.0 when inpainting (diffusers')
            extra["Denoising strength"] = args.strength or (1.0 if mask_image is not None else 0.8)
        parameters = infotext(prompt=parsed.prompt if parsed else args.prompt, negative_prompt=args.negative_prompt,
                              steps=args.steps, sampler=sampler, cfg_scale=args.guidance,
                              seed=out.seeds[i] if not args.grid else out.seed, width=size[0], height=size[1],
                              model=_model_name(args.model), styles=styles or None,
                              adapters=[(a, 1.0) if isinstance(a, str) else a for a in adapters]
                              + list(parsed.adapters if parsed else ()), extra=extra)
        if path.lower().endswith(".png"):
            save_png(image, path, parameters)  # the A1111 `parameters` chunk: PNG Info and `impasto info` read it
        else:
            image.save(path)
    t = out.timings
    print(
        f"wrote {', '.join(paths)} (seed {', '.join(map(str, out.seeds))}; plan {t['plan']:.2f}s, "
        f"denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s, total {t['total']:.2f}s)"
    )
    return 0


def _info(args) -> int:
    """Print the A1111 `parameters` text an image carries (what `impasto generate` wrote)."""
    from impasto import RequestError
    from impasto.serve.a1111 import read_parameters

    text = read_parameters(args.image)
    if text is None:
        raise RequestError(f"{args.image}: the image carries no A1111 'parameters' text")
    print(text)
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

    name = os.path.basename(os.path.normpath(model))
    return os.path.splitext(name)[0] if os.path.isfile(model) else name  # A1111 names a checkpoint by its stem


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
    from impasto import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter  # every option's default in --help
    p = argparse.ArgumentParser(prog="impasto", description=__doc__, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"impasto {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images for one prompt", formatter_class=fmt)
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="image path (numbered when several)")
    g.add_argument("--model", default="tiny",
                   help='"tiny", a local diffusers SD-layout folder or an SD 1.x single file (.safetensors)')
    g.add_argument("--config", default=None, metavar="FOLDER",
                   help="for a single-file --model: a diffusers folder whose configs describe it (default: SD 1.5's)")
    g.add_argument("--scheduler", default=None,
                   help='an A1111 sampler ("Euler a", "DPM++ 2M Karras") or diffusers class name; default: the model\'s')
    g.add_argument("--steps", type=int, default=30, help="denoising steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--negative-prompt", default=None, help="what the image should not show")
    g.add_argument("--seed", type=int, default=None, help="default: drawn at random (printed)")
    g.add_argument("--height", type=int, default=None, help="default: the model's (or the init image's)")
    g.add_argument("--width", type=int, default=None, help="default: the model's (or the init image's)")
    g.add_argument("--num-images", type=int, default=1, help="images of the prompt")
    g.add_argument("--seeds", default=None, metavar="S1,S2,...", help="one seed per image (sets --num-images)")
    g.add_argument("--init-image", default=None, metavar="PATH", help="img2img: start from this image")
    g.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting: how far the image is noised, (0, 1]; default: 0.8, 1.0 with --mask")
    g.add_argument("--mask", default=None, metavar="PATH",
                   help="inpainting: repaint the white part of this mask image of --init-image")
    g.add_argument("--clip-skip", type=int, default=None, help="A1111 clip skip: 2 = the penultimate layer")
    g.add_argument("--prompt-syntax", choices=("a1111", "plain"), default="a1111",
                   help="a1111: (word:1.3), [word], BREAK and <lora:NAME:W> tags; plain: the prompt is text")
    g.add_argument("--style", action="append", metavar="NAME=W", help="style guidance with a style adapter")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on cpu, float16 on cuda")
    g.add_argument("--grid", type=int, default=None, help="make N images and write one contact sheet")
    g.add_argument("--register", action="append", metavar="NAME=PATH", help="register an adapter file")
    g.add_argument("--register-dir", default=None, metavar="DIR", help="register every adapter in DIR")
    g.add_argument("--token", action="append", metavar="NAME=TOKEN",
                   help="the placeholder (e.g. <corgi>) of the adapter registered as NAME")
    g.add_argument("--adapter", action="append", metavar="NAME[=SCALE]", help="apply a registered adapter")
    g.add_argument("--ip-adapter-image", action="append", metavar="PATH",
                   help="a reference image for the request's encoder (IP-Adapter) adapter; repeat for several")
    g.add_argument("--image-encoder", default=None, metavar="FOLDER",
                   help="CLIPVisionModelWithProjection folder of encoder adapters given to --register "
                        "(default: an image_encoder/ folder beside the file, else the model folder's image_encoder/)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("-v", "--verbose", action="store_true", help="show the libraries' own logs and bars")
    g.set_defaults(func=_generate)
    i = sub.add_parser("info", help="print the generation parameters stored in an image", formatter_class=fmt)
    i.add_argument("image")
    i.set_defaults(func=_info)
    s = sub.add_parser("serve", help="serve the OpenAI- and A1111-compatible HTTP API over one engine",
                       formatter_class=fmt)
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
    s.add_argument("--ingress-replicas", type=int, default=1, help="with --ray: HTTP ingress replicas")
    s.set_defaults(func=_serve)
    c = sub.add_parser("covariance", help="compute a base model's text-encoding C⁻¹ for Perfusion (rank1)",
                       formatter_class=fmt)
    c.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    c.add_argument("--captions", required=True, help="a text file, one caption per line")
    c.add_argument("--adapter-root", default=None, help="where engine state lives (default: the user cache)")
    c.set_defaults(func=_covariance)
    from .train.cli import add_train_parser

    add_train_parser(sub)
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
