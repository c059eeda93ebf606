"""`impasto train custom-diffusion --model tiny --images DIR --placeholder "<new1>" --class-word star -o OUT`;
`impasto train perfusion --model tiny --images DIR --placeholder "<sks>" --super-word circle -o OUT`.

The closing summary names the time, the bytes and where each file went.
"""

from __future__ import annotations

import os
import sys



def _run_options(p) -> None:
    """The options every method's run has: its seed, checkpoints, resume and the progress bar."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train an adapter through the engine's own kernels (docs/training.md)")
    methods = t.add_subparsers(dest="method", required=True)
    cd = methods.add_parser("custom-diffusion", help="Custom Diffusion: attn2 K/V + a new token (Kumari et al.)")
    cd.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    cd.add_argument("--images", required=True, help="a folder of images of the concept")
    cd.add_argument("--masks", default=None, help="a folder of masks, one per image in the same name order")
    cd.add_argument("--placeholder", default="<new1>", help="the new token, e.g. <new1>")
    cd.add_argument("--class-word", required=True, help="the concept's category, one token (e.g. star)")
    cd.add_argument("--prompt-template", default=None, help='default "a {placeholder} {class_word}"')
    cd.add_argument("-o", "--output", required=True, help="the folder to write the adapter to")
    cd.add_argument("--steps", type=int, default=250, help="optimizer steps (paper: 250 for one concept)")
    cd.add_argument("--lr", type=float, default=1e-5, help="base learning rate, scaled by the batch size")
    cd.add_argument("--no-scale-lr", action="store_true", help="use --lr as given")
    cd.add_argument("--batch-size", type=int, default=4)
    cd.add_argument("--num-prior", type=int, default=0, help="class images the engine generates for prior preservation")
    cd.add_argument("--prior-images", default=None, help="a folder of class images (instead of generating them)")
    cd.add_argument("--prior-weight", type=float, default=1.0)
    cd.add_argument("--freeze", default="crossattn_kv", choices=("crossattn_kv", "crossattn"))
    _run_options(cd)
    cd.add_argument("--compress", action="store_true", help="also write impasto's SVD-compressed kv file")
    cd.add_argument("--hflip", action="store_true", help="random horizontal flips")
    cd.add_argument("--noaug", action="store_true", help="no random-rescale augmentation")
    cd.set_defaults(func=_custom_diffusion)
    add_pair_parser(methods)
    _add_perfusion_parser(methods)
    add_encoder_parser(methods)


def add_encoder_parser(methods) -> None:
    enc = methods.add_parser("encoder", help="an IP-Adapter-layout encoder adapter on the miniature world "
                             "(Taming Encoder's recipe; docs/training.md)")
    enc.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder with image_encoder/')
    enc.add_argument("-o", "--output", required=True, help="the folder to write ip_adapter.safetensors to")
    enc.add_argument("--steps", type=int, default=1000, help="optimizer steps (the shipped adapter: 4000)")
    enc.add_argument("--lr", type=float, default=1e-3)
    enc.add_argument("--batch-size", type=int, default=8)
    enc.add_argument("--tokens", type=int, default=None, help="image tokens per image (default: 4 base, 16 Plus)")
    enc.add_argument("--image-encoder", default=None, help="a CLIPVisionModelWithProjection folder "
                     "(default: the model's image_encoder/)")
    enc.add_argument("--no-cross-reference", action="store_true", help="ablation: condition on the target's own render")
    enc.add_argument("--no-drop", action="store_true", help="ablation: never drop the object embedding or the text")
    enc.add_argument("--plus", action="store_true", help="the Plus variant (a Resampler over the encoder's hidden "
                     "states, 16 tokens) instead of the base variant")
    enc.add_argument("--turn", type=float, default=0.0, help="share of the rows that can turn drawn rotated or "
                     "flipped, target and reference alike (new outlines of the seen shapes; default 0)")
    enc.add_argument("--procedural", type=float, default=0.0, help="share of the rows drawn as a procedural "
                     "outline (engine/tiny/outlines.py; none near a held-out object; default 0)")
    enc.add_argument("--no-coarse", action="store_true", help="every caption names the exact shape and colour "
                     "(the first recipe)")
    _run_options(enc)
    enc.set_defaults(func=_encoder)


def _encoder(args) -> int:
    from .encoder import encoder

    r = encoder(args.model, steps=args.steps, lr=args.lr, batch_size=args.batch_size, tokens=args.tokens,
                seed=args.seed, output=args.output, cross_reference=not args.no_cross_reference, drop=not args.no_drop,
                coarse=not args.no_coarse, variant="ip-adapter-plus" if args.plus else "ip-adapter",
                image_encoder=args.image_encoder, checkpoint_every=args.checkpoint_every, resume=args.resume,
                progress=not args.quiet, turn=args.turn, procedural=args.procedural)
    _summary(r)
    return 0


def _custom_diffusion(args) -> int:
    from . import custom_diffusion

    r = custom_diffusion(args.model, args.images, placeholder=args.placeholder, class_word=args.class_word,
                         masks=args.masks, prompt_template=args.prompt_template, steps=args.steps, lr=args.lr,
                         scale_lr=not args.no_scale_lr, batch_size=args.batch_size, prior_images=args.prior_images,
                         num_prior=args.num_prior, prior_weight=args.prior_weight, freeze=args.freeze, seed=args.seed,
                         output=args.output, compress=args.compress, progress=not args.quiet, resume=args.resume,
                         checkpoint_every=args.checkpoint_every, hflip=args.hflip, aug=not args.noaug)
    per_step = r.seconds / max(1, len(r.losses))
    print(f"trained {r.steps} steps in {r.seconds:.1f} s ({per_step:.2f} s/step), final loss "
          f"{r.losses[-1] if r.losses else float('nan'):.4f}")
    for role, path in r.files.items():
        print(f"  {role}: {path} ({os.path.getsize(path):,} bytes)")
    print(f"wrote {r.nbytes:,} bytes to {os.path.abspath(r.path)}; serve it with "
          f"engine.adapters.register(name, {r.path!r})", file=sys.stdout)
    return 0


def add_pair_parser(methods) -> None:
    """`impasto train pair --model tiny --content a.png --style b.png -o style.safetensors`; several
    pairs of one style: `--content a.png c.png --style b.png d.png --content-prompt "..." "..."`."""
    p = methods.add_parser("pair", help="Pair Customization: a style LoRA from one (content, styled) pair (Jones et al.)")
    p.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    p.add_argument("--content", required=True, nargs="+", help="the content image (several: one per pair)")
    p.add_argument("--style", required=True, nargs="+", help="the same content, styled (one per --content, in order)")
    p.add_argument("--content-prompt", default=["a photo"], nargs="+",
                   help="a caption of the content image (one for every pair, or one per pair)")
    p.add_argument("--style-prompt", default=None, nargs="+",
                   help="default: the content prompt + ' ' + the suffix (one for every pair, or one per pair)")
    p.add_argument("--suffix", default=None, help='the style\'s text, written as impasto.style_suffix ("in sks style")')
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write the style LoRA to")
    p.add_argument("--content-output", default=None, help="also write the content LoRA (a plain LoRA file) here")
    p.add_argument("--content-rank", type=int, default=8)
    p.add_argument("--style-rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=750, help="steps (official: 750)")
    p.add_argument("--style-start", type=int, default=250, help="the first step of the style update (official: 250)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate, constant (official: 1e-5)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (official: 1e-4)")
    p.add_argument("--style-timesteps", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                   help="run the style update only at the steps whose shared timestep is in [LO, HI)")
    p.add_argument("--shift", type=int, default=0, help="the same random horizontal circular shift (px, at most "
                   "this) for both images of the pair, each step (default 0: none, as the official script)")
    p.add_argument("--flip", action="store_true", help="the same random horizontal mirror for both images of the pair")
    p.add_argument("--crop", type=float, default=1.0, help="the same random square crop (side at least this "
                   "fraction) of both images, resized back, each step (default 1: none)")
    p.add_argument("--permute-channels", action="store_true", help="the same random RGB channel permutation for "
                   "both images of the pair, each step (a paired colour augmentation)")
    _run_options(p)
    p.add_argument("--basis-seed", type=int, default=123846, help="seed of the orthonormal basis of the A matrices")
    p.set_defaults(func=_pair)


def _per_pair(values, n: int, flag: str):
    """One CLI value for every pair, or one per pair; a single pair passes plain values (so a
    one-pair run is exactly pair()'s one-pair call)."""
    from .data import TrainInputError

    if values is None:
        return None
    if len(values) not in (1, n):
        raise TrainInputError(f"{flag}: give one value for every pair or one per pair ({n}), got {len(values)}")
    if n == 1:
        return values[0]
    return list(values) if len(values) == n else list(values) * n


def _pair(args) -> int:
    from .data import TrainInputError
    from .pair import pair

    n = len(args.content)
    if len(args.style) != n:
        raise TrainInputError(f"--style: one styled image per --content image ({n}), got {len(args.style)}")
    content, style = _per_pair(args.content, n, "--content"), _per_pair(args.style, n, "--style")
    r = pair(args.model, content, style, content_prompt=_per_pair(args.content_prompt, n, "--content-prompt"),
             style_prompt=_per_pair(args.style_prompt, n, "--style-prompt"), suffix=args.suffix,
             content_rank=args.content_rank, style_rank=args.style_rank, steps=args.steps,
             style_start=args.style_start, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
             basis_seed=args.basis_seed, output=args.output, content_output=args.content_output,
             style_timesteps=tuple(args.style_timesteps) if args.style_timesteps else None, shift=args.shift,
             flip=args.flip, crop=args.crop, permute_channels=args.permute_channels, progress=not args.quiet,
             resume=args.resume, checkpoint_every=args.checkpoint_every)
    last = lambda xs: xs[-1] if xs else float("nan")  # noqa: E731
    print(f"trained {r.steps} steps on {n} pair{'s' if n > 1 else ''} in {r.seconds:.1f} s, final content loss "
          f"{last(r.losses):.4f}, style loss {last(r.style_losses):.4f}")
    if "content" in r.files:
        print(f"wrote the content LoRA to {os.path.abspath(r.files['content'])} (a plain LoRA)")
    from .core import path_nbytes

    print(f"wrote the style LoRA ({path_nbytes(r.path):,} bytes) to {os.path.abspath(r.path)}; serve it with "
          f"engine.adapters.register(name, {r.path!r}, family='style') and Guidance(styles={{name: 3.0}})")
    return 0


def _add_perfusion_parser(methods) -> None:
    """`impasto train perfusion --model tiny --images DIR --placeholder "<sks>" --super-word circle -o OUT`."""
    pf = methods.add_parser("perfusion", help="Perfusion: key-locked gated rank-1 edits + a new token (Tewel et al.)")
    pf.add_argument("--model", default="tiny", help='"tiny" or a local diffusers SD-layout folder')
    pf.add_argument("--images", required=True, help="a folder of images of the concept")
    pf.add_argument("--masks", default=None, help="a folder of masks, one per image in the same name order")
    pf.add_argument("--placeholder", default="<sks>", help="the new token, e.g. <sks>")
    pf.add_argument("--super-word", required=True, help="the concept's category, one token (e.g. circle): the key lock")
    pf.add_argument("--prompt-template", default=None, help='default "a {placeholder}"')
    pf.add_argument("-o", "--output", required=True, help="the folder to write the adapter to")
    pf.add_argument("--steps", type=int, default=250)
    pf.add_argument("--lr-embedding", type=float, default=0.006, help="the placeholder row's learning rate")
    pf.add_argument("--lr-value", type=float, default=0.03, help="o*_V's (and o*_K's with --no-key-lock) learning rate")
    pf.add_argument("--batch-size", type=int, default=4)
    pf.add_argument("--accumulate", type=int, default=1,
                    help="micro-batches per optimizer step, i*'s EMA on each (ChenDarYen: 4)")
    pf.add_argument("--beta", type=float, default=0.75, help="the gate's bias during training")
    pf.add_argument("--tau", type=float, default=0.1, help="the gate's temperature during training")
    pf.add_argument("--ema", type=float, default=0.99, help="i* <- ema * i* + (1 - ema) * the concept's encoding")
    pf.add_argument("--serve-beta", type=float, default=None, help="β written into the file (default 0.7)")
    pf.add_argument("--serve-tau", type=float, default=None, help="τ written into the file (default 0.15)")
    pf.add_argument("--no-key-lock", dest="key_lock", action="store_false", help="also train o*_K (an ablation)")
    pf.add_argument("--global-lock", action="store_true", help="the K pathway reads the prompt with the super word")
    pf.add_argument("--covariance-captions", default=None,
                    help="a text file, one caption per line: computes C⁻¹ if the base has none")
    pf.add_argument("--adapter-root", default=None, help="where engine state (C⁻¹) lives (default: the user cache)")
    _run_options(pf)
    pf.add_argument("--hflip", action="store_true", help="random horizontal flips (not for asymmetric objects)")
    pf.set_defaults(func=_perfusion)


def _perfusion(args) -> int:
    import impasto

    from . import perfusion

    captions = None
    if args.covariance_captions is not None:
        with open(args.covariance_captions, encoding="utf-8") as f:
            captions = [line.strip() for line in f if line.strip()]
    engine = impasto.Engine.from_pretrained(args.model, adapter_root=args.adapter_root)
    try:
        r = perfusion(engine, args.images, placeholder=args.placeholder, super_word=args.super_word, masks=args.masks,
                      prompt_template=args.prompt_template, steps=args.steps, lr_embedding=args.lr_embedding,
                      lr_value=args.lr_value, batch_size=args.batch_size, accumulate=args.accumulate, beta=args.beta,
                      tau=args.tau, ema=args.ema,
                      global_lock=args.global_lock, key_lock=args.key_lock, seed=args.seed, output=args.output,
                      progress=not args.quiet, resume=args.resume, checkpoint_every=args.checkpoint_every,
                      hflip=args.hflip, serve_beta=args.serve_beta, serve_tau=args.serve_tau,
                      covariance_captions=captions)
    finally:
        engine.close()
    _summary(r)
    return 0


def _summary(r) -> None:
    from .core import path_nbytes

    per_step = r.seconds / max(1, len(r.losses))
    print(f"trained {r.steps} steps in {r.seconds:.1f} s ({per_step:.2f} s/step), final loss "
          f"{r.losses[-1] if r.losses else float('nan'):.4f}")
    for role, path in r.files.items():
        print(f"  {role}: {path} ({path_nbytes(path):,} bytes)")
    print(f"wrote {r.nbytes:,} bytes to {os.path.abspath(r.path)}; serve it with "
          f"engine.adapters.register(name, {next(iter(r.files.values()))!r})")
