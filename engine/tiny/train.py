"""Train the miniature model on the world, stage by stage, on a CPU.

    python -m impasto.tiny.train data       --run /work/tiny_runs/r2
    python -m impasto.tiny.train vae        --run /work/tiny_runs/r2 --steps 5000 --threads 2
    python -m impasto.tiny.train clip       --run /work/tiny_runs/r2 --steps 800
    python -m impasto.tiny.train probes     --run /work/tiny_runs/r2 --steps 1400
    python -m impasto.tiny.train latents    --run /work/tiny_runs/r2 --threads 2
    python -m impasto.tiny.train probes_vae --run /work/tiny_runs/r2 --steps 700   (probes also read VAE output)
    python -m impasto.tiny.train unet       --run /work/tiny_runs/r2 --steps 8000 --threads 2
    python -m impasto.tiny.train export     --run /work/tiny_runs/r2 --out engine/tiny/model
    python -m impasto.tiny.train decoder    --run ... --steps 3000  (optional: decoder only; latents unchanged)
    python -m impasto.tiny.train image_encoder --run R --steps 1500   (the encoder adapter's tower, written to
                                                                      engine/tiny/model/ip_adapter/image_encoder/)

(The shipped run's record, with times and losses, is in docs/tiny.md.)
Every stage is seeded (--seed), writes `<stage>.pt` checkpoints every --ckpt-every steps and
resumes from them: re-running a stage with a larger --steps continues where it stopped. Each
stage logs to `<run>/<stage>.log`. Run under `nice -n 19`; --threads sets torch's threads
(default 1). See docs/tiny.md for the recorded commands, times and losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import TOKENIZER_DIR, outlines, world

# --------------------------------------------------------------------------- configs
TEXT_WIDTH = 64
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    projection_dim=TEXT_WIDTH,
)
VISION_CONFIG = dict(
    hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4,
    projection_dim=TEXT_WIDTH, num_channels=3,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=8, norm_num_groups=8, sample_size=32,  # 4 channels lost small shapes (r1: 74% after encode->decode)
)
UNET_CONFIG = dict(
    sample_size=8, in_channels=8, out_channels=8, block_out_channels=(64, 128, 128), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=16,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)
TEXT_TRAIN_LEN = 24  # captions are <= ~20 tokens; causal attention makes earlier positions exact

ATTRS = ("shape", "colour", "background", "style", "count", "size")
PROBE_CLASSES = dict(shape=world.PROBE_SHAPES, colour=world.COLOUR_NAMES, background=world.BACKGROUNDS,
                     style=world.ALL_STYLES, count=world.COUNTS, size=world.SIZE_NAMES)
BASE_CLASSES = dict(shape=world.SHAPES, colour=world.COLOUR_NAMES, background=world.BACKGROUNDS,
                    style=world.STYLES, count=world.COUNTS, size=world.SIZE_NAMES)

DATA_SEEDS = dict(base=1, probe=2, probe_val=3)  # the world streams each stage reads


# --------------------------------------------------------------------------- utilities
class Log:
    def __init__(self, run, stage):
        self.f = open(os.path.join(run, f"{stage}.log"), "a", buffering=1)
        self.t0 = time.time()

    def __call__(self, msg):
        line = f"{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.1f}s {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def to_tensor(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def load_data(run, name):
    d = np.load(os.path.join(run, f"data_{name}.npz"), allow_pickle=False)
    out = {k: d[k] for k in d.files}
    out["captions"] = [str(c) for c in out["captions"]]
    return out


def save_ckpt(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_ckpt(path):
    return torch.load(path, weights_only=True) if os.path.exists(path) else None


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)


def tokenize(tok, captions, length=77):
    return tok(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def train_loop(args, stage, model_params, step_fn, modules: dict, log_every=25, extra_state=None):
    """Generic resumable loop: AdamW with warmup then cosine to 10% over args.steps."""
    ckpt_path = os.path.join(args.run, f"{stage}.pt")
    params = [p for p in model_params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)
    step = 0
    ck = load_ckpt(ckpt_path)
    log = Log(args.run, stage)
    if ck is not None:
        for k, m in modules.items():
            m.load_state_dict(ck[k])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"])
        if extra_state is not None:
            extra_state.update(ck.get("extra", {}))
        log(f"resumed from step {step}")
    else:
        torch.manual_seed(args.seed)
    warm = min(100, args.steps // 10)
    running = {}
    t_last = time.time()
    while step < args.steps:
        lr = args.lr * (step + 1) / warm if step < warm else args.lr * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        losses = step_fn(step)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if "after_step" in (extra_state or {}):
            extra_state["after_step"]()
        step += 1
        for k, v in losses.items():
            v = float(v.detach()) if torch.is_tensor(v) else float(v)
            running[k] = running[k] * 0.9 + v * 0.1 if k in running else v
        if step % log_every == 0 or step == args.steps:
            dt = (time.time() - t_last) / log_every
            t_last = time.time()
            log(f"step {step}/{args.steps} lr {lr:.2e} " + " ".join(f"{k} {v:.4f}" for k, v in running.items())
                + f" ({dt:.2f}s/step)")
        if step % args.ckpt_every == 0 or step == args.steps:
            state = {k: m.state_dict() for k, m in modules.items()}
            ex = {k: v for k, v in (extra_state or {}).items() if k != "after_step"}
            save_ckpt(ckpt_path, **state, opt=opt.state_dict(), step=step, rng=torch.get_rng_state(), extra=ex)
    log(f"done at step {step}; final " + " ".join(f"{k} {v:.4f}" for k, v in running.items()))
    return log


def batch_index(seed, step, n, bs):
    return np.random.default_rng([seed, step]).integers(0, n, bs)


# --------------------------------------------------------------------------- stages
def stage_data(args):
    """Render the world streams to <run>/data_<name>.npz."""
    log = Log(args.run, "data")
    plans = dict(base=(args.n_base, {}), probe=(args.n_probe, dict(novel_objects=0.25, novel_styles=0.3)),
                 probe_val=(2000, dict(novel_objects=0.25, novel_styles=0.3)))
    for name in args.which.split(","):
        n, kw = plans[name]
        path = os.path.join(args.run, f"data_{name}.npz")
        if os.path.exists(path):
            log(f"{name}: exists")
            continue
        t = time.time()
        d = world.dataset(DATA_SEEDS[name], n, **kw)
        np.savez(path + ".tmp.npz", images=d["images"], captions=np.array(d["captions"]),
                 **{f"label_{k}": v for k, v in d["labels"].items()})
        os.replace(path + ".tmp.npz", path)
        log(f"{name}: {n} images (seed {DATA_SEEDS[name]}, {kw}) in {time.time() - t:.0f}s")


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def stage_vae(args, decoder_only=False):
    """AutoencoderKL: L1 + MSE reconstruction, KL weight 1e-6, plus an L1 on image finite
    differences (sharper edges). `decoder` stage: encoder frozen (so latents already computed stay
    valid), decoder trained further."""
    data = load_data(args.run, "base")
    images = data["images"]
    torch.manual_seed(args.seed)
    vae = build_vae()
    stage = "decoder" if decoder_only else "vae"
    if decoder_only:
        vae.load_state_dict(load_ckpt(os.path.join(args.run, "vae.pt"))["vae"])
        for name, p in vae.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))

    def step_fn(step):
        idx = batch_index(args.seed + 10, step, len(images), args.bs)
        x = to_tensor(images[idx])
        if decoder_only:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            rec = vae.decode(z).sample
            kl = torch.zeros(())
        else:
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            kl = post.kl().mean()
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        loss = l1 + mse + 1e-6 * kl
        # sharper edges: L1 on horizontal and vertical finite differences too
        edge = ((rec.diff(dim=2) - x.diff(dim=2)).abs().mean() + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean())
        loss = loss + 0.5 * edge
        return dict(loss=loss, l1=l1, mse=mse, kl=kl)

    train_loop(args, stage, vae.parameters(), step_fn, {"vae": vae})


def build_clip():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG))
    text_proj = torch.nn.Linear(TEXT_WIDTH, TEXT_WIDTH, bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    heads_t = torch.nn.ModuleDict({k: torch.nn.Linear(TEXT_WIDTH, len(v)) for k, v in BASE_CLASSES.items()})
    heads_i = torch.nn.ModuleDict({k: torch.nn.Linear(TEXT_WIDTH, len(v)) for k, v in BASE_CLASSES.items()})
    return text, vision, text_proj, logit_scale, heads_t, heads_i


def stage_clip(args):
    """CLIP-style text and image encoders, trained contrastively on the base world (InfoNCE both
    ways, learned temperature) with auxiliary attribute heads on both embeddings (cross-entropy
    for each attribute the caption names), which makes every attribute linearly readable."""
    data = load_data(args.run, "base")
    images, captions = data["images"], data["captions"]
    labels = {k: torch.from_numpy(data[f"label_{k}"]) for k in ATTRS}
    torch.manual_seed(args.seed)
    text, vision, text_proj, logit_scale, heads_t, heads_i = build_clip()
    holder = torch.nn.Module()
    holder.text, holder.vision, holder.text_proj, holder.heads_t, holder.heads_i = (
        text, vision, text_proj, heads_t, heads_i)
    holder.logit_scale = logit_scale
    tok = tokenizer()
    named = [world.parse_prompt(c) for c in captions]

    def step_fn(step):
        idx = batch_index(args.seed + 20, step, len(images), args.bs)
        x = to_tensor(images[idx])
        ids = tokenize(tok, [captions[i] for i in idx], TEXT_TRAIN_LEN)
        tout = text(ids)
        t_emb = F.normalize(text_proj(tout.pooler_output), dim=-1)
        i_emb = F.normalize(vision(pixel_values=x).image_embeds, dim=-1)
        logits = logit_scale.exp().clamp(max=100) * i_emb @ t_emb.T
        target = torch.arange(len(idx))
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        aux_i = aux_t = 0.0
        for k in ATTRS:
            y = labels[k][idx]
            aux_i = aux_i + F.cross_entropy(heads_i[k](i_emb * 10), y)
            present = torch.tensor([k in named[i] for i in idx])
            if present.any():
                aux_t = aux_t + F.cross_entropy(heads_t[k](t_emb * 10)[present], y[present])
        acc = (logits.argmax(1) == target).float().mean()
        return dict(loss=nce + 0.3 * (aux_i + aux_t), nce=nce, aux_i=aux_i, aux_t=aux_t, acc=acc)

    train_loop(args, "clip", holder.parameters(), step_fn, {"clip": holder})


# The image tower of the first `clip` stage reads colour and background but hardly any shape: a
# linear probe on its image_embeds reads shape 0.19 (chance 0.125) even on that stage's own
# training stream, because in-batch InfoNCE over random scenes is solved by colour and background
# (docs/tiny.md). Encoder adapters need an image embedding that carries the object's shape, as a
# real IP-Adapter's CLIP ViT does; this stage trains one, against the *frozen* shipped text tower.
SHAPE_ENCODER_SEED = 6  # its world stream (seen vocabulary only: the held-out objects stay unseen)
SILHOUETTE = 16  # side of the canonical silhouette the shape head reconstructs


def canonical_silhouette(shape: str) -> np.ndarray:
    """Semantics: the coverage of `shape` drawn centred and large, box-filtered to
    [SILHOUETTE, SILHOUETTE] float32 in [0, 1]: its geometry without size, position or colour."""
    m = world._mask(shape, [(world.SIZE / 2, world.SIZE / 2)], world.SIZE / 2 - 1.5)[..., 0]
    k = world.SIZE // SILHOUETTE
    return m.reshape(SILHOUETTE, k, SILHOUETTE, k).mean((1, 3)).astype(np.float32)


def shape_encoder_batch(seed: int, step: int, batch_size: int, procedural: float = 0.0) -> dict:
    """Batch `step` of the image-encoder stage, a pure function of (seed, step): groups of
    len(world.SHAPES) rows that share colour, background, style, count and size and differ only in
    shape (each its own render and jitter), so in-batch InfoNCE cannot match captions by colour or
    background alone; every other group is a lone object on the gray background (what a masked
    reference is: references.GRAY is world gray). Seen shapes only.

    Returns {"images": uint8 [B, 32, 32, 3], "captions": B world captions (usual omissions),
    "shape": int64 [B] index in world.SHAPES}. procedural > 0: each group is, with that
    probability, 8 distinct procedural outlines (outlines.py, none near a held-out one) sharing
    the group's attributes instead, "shape" -1 on its rows; "outline": B shape names (the seen
    shape or "outline-<seed>"). procedural=0 is the stream without it, bit for bit."""
    n = len(world.SHAPES)
    images, captions, shapes, names = [], [], [], []
    for g in range((batch_size + n - 1) // n):
        if procedural and np.random.default_rng([seed, step, g, 9]).random() < procedural:
            rng = np.random.default_rng([seed, step, g, 10])
            base = world.sample_scene(rng, **(dict(background="gray", count=1) if g % 2 else {}))
            for _ in range(n):
                s = world.sample_scene(rng, shape=outlines.name(outlines.draw_seed(rng)), colour=base.colour,
                                       style=base.style, background=base.background, count=base.count, size=base.size)
                images.append(world.render(s, rng))
                captions.append(world.caption(s, rng))
                shapes.append(-1)
                names.append(s.shape)
            continue
        rng = np.random.default_rng([seed, step, g])
        base = world.sample_scene(rng, **(dict(background="gray", count=1) if g % 2 else {}))
        for j in rng.permutation(n):
            s = world.sample_scene(rng, shape=world.SHAPES[j], colour=base.colour, style=base.style,
                                   background=base.background, count=base.count, size=base.size)
            images.append(world.render(s, rng))
            captions.append(world.caption(s, rng))
            shapes.append(int(j))
            names.append(s.shape)
    out = {"images": np.stack(images[:batch_size]), "captions": captions[:batch_size],
           "shape": np.array(shapes[:batch_size], np.int64)}
    if procedural:
        out["outline"] = names[:batch_size]
    return out


def load_shipped_text_tower(model_dir):
    """(CLIPTextModel fp32, text projection [E, D] fp32, frozen) of a shipped model folder."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", local_files_only=True,
                                         dtype=torch.float32)
    proj = load_file(os.path.join(model_dir, "clip", "text_projection.safetensors"))["text_projection"].float()
    return text.eval().requires_grad_(False), proj


def stage_image_encoder(args):
    """A new tiny image tower (VISION_CONFIG, from scratch) whose image_embeds carry shape: symmetric
    InfoNCE against the frozen shipped text tower (text_encoder + clip/text_projection) on
    shape-contrastive batches (`shape_encoder_batch`), plus a shape cross-entropy head and a
    canonical-silhouette head on the normalized embedding. Neither the text tower, the
    probes nor the world streams change. Writes `<out>/ip_adapter/image_encoder/` (fp16) when done."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from . import SHIPPED_DIR

    text, proj = load_shipped_text_tower(args.text_from or SHIPPED_DIR)
    tok = tokenizer()
    torch.manual_seed(args.seed)
    holder = torch.nn.Module()
    holder.vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION_CONFIG))
    holder.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    holder.shape_head = torch.nn.Linear(TEXT_WIDTH, len(world.SHAPES))
    holder.silhouette_head = torch.nn.Linear(TEXT_WIDTH, SILHOUETTE * SILHOUETTE)
    silhouettes = torch.from_numpy(np.stack([canonical_silhouette(s) for s in world.SHAPES])).flatten(1)

    def step_fn(step):
        if args.procedural:  # outlines: the silhouette head only (their captions name no shape of their own)
            return procedural_step(step)
        b = shape_encoder_batch(args.seed + SHAPE_ENCODER_SEED, step, args.bs)
        with torch.no_grad():
            t = F.normalize(text(tokenize(tok, b["captions"], TEXT_TRAIN_LEN)).pooler_output @ proj.T, dim=-1)
        e = F.normalize(holder.vision(pixel_values=to_tensor(b["images"])).image_embeds, dim=-1)
        logits = holder.logit_scale.exp().clamp(max=100) * e @ t.T
        target = torch.arange(len(e))
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        y = torch.from_numpy(b["shape"])
        shape_ce = F.cross_entropy(holder.shape_head(e * 10), y)
        sil = F.binary_cross_entropy_with_logits(holder.silhouette_head(e * 10), silhouettes[y])
        acc = (logits.argmax(1) == target).float().mean()
        return dict(loss=nce + args.shape_weight * (shape_ce + sil), nce=nce, shape_ce=shape_ce, sil=sil, acc=acc)

    def procedural_step(step):
        b = shape_encoder_batch(args.seed + SHAPE_ENCODER_SEED, step, args.bs, procedural=args.procedural)
        seen = torch.from_numpy(b["shape"] >= 0)
        e = F.normalize(holder.vision(pixel_values=to_tensor(b["images"])).image_embeds, dim=-1)
        sil_t = torch.from_numpy(np.stack([canonical_silhouette(n) for n in b["outline"]])).flatten(1)
        sil = F.binary_cross_entropy_with_logits(holder.silhouette_head(e * 10), sil_t)
        if not seen.any():
            return dict(loss=args.shape_weight * sil, sil=sil)
        with torch.no_grad():
            caps = [c for c, k in zip(b["captions"], seen.tolist()) if k]
            t = F.normalize(text(tokenize(tok, caps, TEXT_TRAIN_LEN)).pooler_output @ proj.T, dim=-1)
        es = e[seen]
        logits = holder.logit_scale.exp().clamp(max=100) * es @ t.T
        target = torch.arange(len(es))
        nce = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        shape_ce = F.cross_entropy(holder.shape_head(es * 10), torch.from_numpy(b["shape"])[seen])
        acc = (logits.argmax(1) == target).float().mean()
        return dict(loss=nce + args.shape_weight * (shape_ce + sil), nce=nce, shape_ce=shape_ce, sil=sil, acc=acc)

    train_loop(args, "image_encoder", holder.parameters(), step_fn, {"image_encoder": holder})
    out = os.path.join(args.out, "ip_adapter", "image_encoder")
    export_image_encoder(holder.vision, out)
    Log(args.run, "image_encoder")(f"wrote {out}")


def image_processor():
    """The processor the tiny image towers read pixels through: [-1, 1] (mean = std = 0.5), as
    they were trained (to_tensor)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size=VISION_CONFIG["image_size"], crop_size=VISION_CONFIG["image_size"],
                              image_mean=[0.5] * 3, image_std=[0.5] * 3)


def export_image_encoder(vision, out):
    """Write `vision` as a CLIPVisionModelWithProjection folder (fp16 safetensors) with
    `image_processor()`."""
    import shutil

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vision.half().save_pretrained(tmp, safe_serialization=True)
    vision.float()
    image_processor().save_pretrained(tmp)
    for f in os.listdir(tmp):
        os.chmod(os.path.join(tmp, f), 0o644)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)


def stage_probes(args):
    from .probes import Probes

    data = load_data(args.run, "probe")
    val = load_data(args.run, "probe_val")
    images = data["images"]
    labels = {k: torch.from_numpy(data[f"label_{k}"]) for k in ATTRS}
    torch.manual_seed(args.seed)
    model = Probes()

    def step_fn(step):
        model.train()
        idx = batch_index(args.seed + 30, step, len(images), args.bs)
        x = to_tensor(images[idx])
        g = torch.Generator().manual_seed(step)
        # robustness to a generator's output: mild blur and noise on some images
        if step % 2 == 1:
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) * 0.5 + x * 0.5
        x = x + torch.randn(x.shape, generator=g) * 0.03
        out = model(x)
        losses = {k: F.cross_entropy(out[k], labels[k][idx]) for k in ATTRS}
        return dict(loss=sum(losses.values()), **losses)

    train_loop(args, "probes", model.parameters(), step_fn, {"probes": model})
    model.eval()
    acc = probe_accuracy(model, val)
    Log(args.run, "probes")(f"validation (seed {DATA_SEEDS['probe_val']}, unseen): {json.dumps(acc)}")


def stage_probes_vae(args):
    """Fine-tune the probes (from probes.pt) so they also read images that went through the
    final VAE: each batch is half clean world images, half their VAE reconstructions
    (encode -> posterior sample -> decode with the decoder stage's weights), true labels. The
    judges must read the base model's decoder output as well as clean pictures; validation
    reports both."""
    from .probes import Probes

    data = load_data(args.run, "probe")
    val = load_data(args.run, "probe_val")
    images = data["images"]
    labels = {k: torch.from_numpy(data[f"label_{k}"]) for k in ATTRS}
    vae = load_final_vae(args.run)
    torch.manual_seed(args.seed)
    model = Probes()
    model.load_state_dict(load_ckpt(os.path.join(args.run, "probes.pt"))["probes"])

    def step_fn(step):
        model.train()
        idx = batch_index(args.seed + 31, step, len(images), args.bs)
        x = to_tensor(images[idx])
        half = len(idx) // 2
        with torch.no_grad():
            x[half:] = vae.decode(vae.encode(x[half:]).latent_dist.sample()).sample.clamp(-1, 1)
        out = model(x)
        losses = {k: F.cross_entropy(out[k], labels[k][idx]) for k in ATTRS}
        return dict(loss=sum(losses.values()), **losses)

    train_loop(args, "probes_vae", model.parameters(), step_fn, {"probes": model})
    model.eval()
    log = Log(args.run, "probes_vae")
    log(f"validation clean (seed {DATA_SEEDS['probe_val']}, unseen): {json.dumps(probe_accuracy(model, val))}")
    rec = dict(val)
    with torch.no_grad():
        rec["images"] = np.concatenate([
            ((vae.decode(vae.encode(to_tensor(val["images"][s : s + 250])).latent_dist.mode()).sample.clamp(-1, 1)
              + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            for s in range(0, len(val["images"]), 250)])
    log(f"validation VAE reconstructions (seed {DATA_SEEDS['probe_val']}): {json.dumps(probe_accuracy(model, rec))}")


def load_final_vae(run):
    vae = build_vae()
    vae.load_state_dict((load_ckpt(os.path.join(run, "decoder.pt")) or load_ckpt(os.path.join(run, "vae.pt")))["vae"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def probe_accuracy(model, data, bs=256):
    preds = {k: [] for k in ATTRS}
    for s in range(0, len(data["images"]), bs):
        out = model(to_tensor(data["images"][s : s + bs]))
        for k in ATTRS:
            preds[k].append(out[k].argmax(1))
    return {k: float((torch.cat(preds[k]).numpy() == data[f"label_{k}"]).mean()) for k in ATTRS}


def stage_latents(args):
    """Encode the base images with the (frozen) VAE encoder: latent mean and std, fp16."""
    log = Log(args.run, "latents")
    data = load_data(args.run, "base")
    vae = build_vae()
    vae.load_state_dict(load_ckpt(os.path.join(args.run, "vae.pt"))["vae"])
    vae.eval()
    means, stds = [], []
    t = time.time()
    with torch.no_grad():
        for s in range(0, len(data["images"]), 256):
            d = vae.encode(to_tensor(data["images"][s : s + 256])).latent_dist
            means.append(d.mean.half())
            stds.append(d.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = float(1.0 / mean.float().std())
    torch.save(dict(mean=mean, std=std, scaling_factor=scaling), os.path.join(args.run, "latents.pt"))
    log(f"encoded {len(mean)} images in {time.time() - t:.0f}s; latent std {mean.float().std():.4f} "
        f"-> scaling_factor {scaling:.4f}; mean posterior std {std.float().mean():.4f}")


def load_text_encoder(run):
    text, *_ = build_clip()
    state = load_ckpt(os.path.join(run, "clip.pt"))["clip"]
    text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
    return text.eval().requires_grad_(False)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def stage_unet(args):
    """UNet2DConditionModel, epsilon prediction on VAE latents x scaling_factor, SD's
    scaled_linear DDPM schedule, min-SNR(5) loss weighting, 10% empty captions (for
    classifier-free guidance), frozen text encoder, EMA of the weights (0.998)."""
    from diffusers import DDPMScheduler

    data = load_data(args.run, "base")
    captions = data["captions"]
    lat = torch.load(os.path.join(args.run, "latents.pt"), weights_only=True)
    mean, std, scaling = lat["mean"], lat["std"], lat["scaling_factor"]
    text = load_text_encoder(args.run)
    tok = tokenizer()
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one", "steps_offset")})
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    torch.manual_seed(args.seed)
    unet = build_unet()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ema_params = list(ema.parameters())
    params = list(unet.parameters())

    def ema_update():
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - args.ema)

    def step_fn(step):
        g = torch.Generator().manual_seed(args.seed * 100003 + step)
        idx = batch_index(args.seed + 40, step, len(mean), args.bs)
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g)) * scaling
        drop = torch.rand(len(idx), generator=g) < 0.1
        caps = ["" if d else captions[i] for d, i in zip(drop.tolist(), idx)]
        with torch.no_grad():
            cond = text(tokenize(tok, caps)).last_hidden_state
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-gamma weighting for epsilon prediction
        per = (pred - noise).pow(2).mean((1, 2, 3))
        return dict(loss=(per * w).mean(), mse=per.mean())

    extra = {"after_step": ema_update}
    if args.ema_reset_at:
        # restart the EMA from the live weights at step `ema_reset_at` (an EMA begun at step 0
        # keeps 0.998^step of the random init: 25% at step 700)
        orig = ema_update

        def ema_update():
            if unet_step[0] == args.ema_reset_at:
                ema.load_state_dict(unet.state_dict())
            unet_step[0] += 1
            orig()

        unet_step = [0]
        ck = load_ckpt(os.path.join(args.run, "unet.pt"))
        unet_step[0] = ck["step"] if ck else 0
        extra["after_step"] = ema_update
    train_loop(args, "unet", params, step_fn, {"unet": unet, "ema": ema}, extra_state=extra)


def stage_export(args):
    """Write the diffusers folder: fp16 safetensors, scaling_factor from the latents stage,
    image encoder, probes, C^-1 for Perfusion, and a training record."""
    from .export import export

    export(args.run, args.out, unet_weights=args.unet_weights)


STAGES = dict(data=stage_data, vae=stage_vae, decoder=lambda a: stage_vae(a, decoder_only=True), clip=stage_clip,
              probes=stage_probes, probes_vae=stage_probes_vae, latents=stage_latents, unet=stage_unet, export=stage_export,
              image_encoder=stage_image_encoder)
DEFAULTS = dict(  # stage -> (batch size, lr)
    vae=(16, 1e-3), decoder=(16, 5e-4), clip=(64, 1e-3), probes=(64, 2e-3), probes_vae=(64, 5e-4), unet=(32, 6e-4),
    image_encoder=(64, 1e-3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--run", required=True, help="folder for data, checkpoints and logs (outside the repo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--bs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--wd", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--unet-weights", default="ema", choices=("ema", "unet"), help="export: which UNet weights ship")
    p.add_argument("--ema-reset-at", type=int, default=0, help="unet: copy the live weights into the EMA at this step")
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-base", type=int, default=40000)
    p.add_argument("--n-probe", type=int, default=24000)
    p.add_argument("--shape-weight", type=float, default=1.0, help="image_encoder: weight of the shape heads")
    p.add_argument("--procedural", type=float, default=0.0, help="image_encoder: share of the shape groups drawn "
                   "as 8 procedural outlines (engine/tiny/outlines.py; silhouette head only; default 0)")
    p.add_argument("--text-from", default=None, help="image_encoder: model folder of the frozen text tower "
                   "(default: the shipped one)")
    p.add_argument("--which", default="base,probe,probe_val", help="data stage: which streams")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))
    args = p.parse_args(argv)
    bs, lr = DEFAULTS.get(args.stage, (32, 1e-3))
    args.bs = args.bs or bs
    args.lr = args.lr or lr
    torch.set_num_threads(args.threads)
    os.makedirs(args.run, exist_ok=True)
    STAGES[args.stage](args)


if __name__ == "__main__":
    main()
