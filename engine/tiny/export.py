"""Write a training run as the shipped diffusers folder (engine/tiny/model/).

    model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/   -- what load_base_model reads
    image_encoder/                        -- CLIPVisionModelWithProjection (tiny-CLIP image tower)
    clip/text_projection.safetensors      -- tiny-CLIP's text projection and logit scale
    probes/probes.safetensors, config.json -- the attribute probes (impasto.tiny.probes)
    perfusion_covariance.safetensors      -- C^-1 [D, D] fp32 for Perfusion, with a metadata note
    training.json                         -- configs, seeds, steps, final losses of the run

Weights are stored as fp16 safetensors (C^-1 stays fp32).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from . import TOKENIZER_DIR, world
from . import train as T

COVARIANCE_CAPTIONS = 5000
COVARIANCE_SEED = 5


def _state(run, stage):
    return T.load_ckpt(os.path.join(run, f"{stage}.pt"))


def _sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def text_covariance(text_encoder, n=COVARIANCE_CAPTIONS, seed=COVARIANCE_SEED, bs=500):
    """C = E[e e^T], the uncentered covariance of text encodings e (last hidden state, every one
    of the 77 positions, padding included, as Perfusion's estimate_C_inv.py), over `n` world
    captions of stream `seed` (seen vocabulary, captions with random omissions)."""
    import numpy as np

    tok = T.tokenizer()
    caps = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        caps.append(world.caption(world.sample_scene(rng), rng))
    d = text_encoder.config.hidden_size
    acc = torch.zeros(d, d, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for s in range(0, n, bs):
            e = text_encoder(T.tokenize(tok, caps[s : s + bs])).last_hidden_state.double().reshape(-1, d)
            acc += e.T @ e
            count += e.shape[0]
    return (acc / count).float(), count


def export(run: str, out: str, covariance: bool = True, unet_weights: str = "ema") -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    from .probes import Probes

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    lat = torch.load(os.path.join(run, "latents.pt"), weights_only=True)
    vae = AutoencoderKL(**T.VAE_CONFIG, scaling_factor=lat["scaling_factor"])
    dec = _state(run, "decoder") or _state(run, "vae")
    vae.load_state_dict(dec["vae"])
    unet = T.build_unet()
    unet.load_state_dict(_state(run, "unet")[unet_weights])  # "ema" or "unet" (the live weights)
    clip = _state(run, "clip")["clip"]
    text = T.load_text_encoder(run)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**T.VISION_CONFIG))
    vision.load_state_dict(_sub(clip, "vision."))
    from transformers import CLIPTextModel

    text_plain = CLIPTextModel(CLIPTextConfig(**T.TEXT_CONFIG))
    text_plain.load_state_dict(text.state_dict())
    tok = T.tokenizer()
    sched = DDIMScheduler(**T.SCHEDULER_CONFIG)
    cov, count = text_covariance(text_plain) if covariance else (torch.eye(T.TEXT_WIDTH), 0)
    pipe = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text_plain.half(), tokenizer=tok, unet=unet.half(), scheduler=sched,
        safety_checker=None, feature_extractor=None, image_encoder=vision.half(), requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    # the image tower reads pixels in [-1, 1] (trained so): the processor encoder adapters use
    T.image_processor().save_pretrained(os.path.join(tmp, "image_encoder"))
    # the tokenizer: the vendored CLIP BPE files, verbatim (with their licence)
    shutil.rmtree(os.path.join(tmp, "tokenizer"))
    shutil.copytree(TOKENIZER_DIR, os.path.join(tmp, "tokenizer"))

    os.makedirs(os.path.join(tmp, "clip"))
    save_file({"text_projection": clip["text_proj.weight"].half().contiguous(),
               "logit_scale": clip["logit_scale"].reshape(1).float()},
              os.path.join(tmp, "clip", "text_projection.safetensors"))

    probes = Probes()
    probes.load_state_dict((_state(run, "probes_vae") or _state(run, "probes"))["probes"])
    os.makedirs(os.path.join(tmp, "probes"))
    save_file({k: v.half().contiguous() for k, v in probes.state_dict().items()},
              os.path.join(tmp, "probes", "probes.safetensors"))
    from .probes import CLASSES

    with open(os.path.join(tmp, "probes", "config.json"), "w") as f:
        json.dump({k: list(map(str, v)) for k, v in CLASSES.items()}, f, indent=1)

    c_inv = torch.linalg.inv(cov.double()).float()
    save_file({"C_inv": c_inv.contiguous(), "C": cov.contiguous()}, os.path.join(tmp, "perfusion_covariance.safetensors"),
              metadata={"note": (f"C = E[e e^T] (uncentered) of the tiny text encoder's last hidden state over all 77 "
                                 f"positions, padding included, of {COVARIANCE_CAPTIONS} world captions (stream seed "
                                 f"{COVARIANCE_SEED}, seen vocabulary; {count} token vectors); C_inv = inverse(C) in "
                                 f"float64, stored fp32. As Perfusion's data/estimate_C_inv.py."),
                        "dim": str(cov.shape[0])})
    record = {"configs": dict(unet=T.UNET_CONFIG, vae=T.VAE_CONFIG, text=T.TEXT_CONFIG, vision=T.VISION_CONFIG,
                              scheduler=T.SCHEDULER_CONFIG),
              "scaling_factor": lat["scaling_factor"], "unet_weights": unet_weights}
    for stage in ("vae", "decoder", "clip", "probes", "probes_vae", "unet"):
        st = _state(run, stage)
        if st is not None:
            record[f"{stage}_steps"] = st["step"]
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(record, f, indent=1, default=list)
    for folder, _, files in os.walk(tmp):
        for f in files:
            os.chmod(os.path.join(folder, f), 0o644)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
