"""The miniature Stable-Diffusion-layout model that ships with impasto.

`Engine.from_pretrained("tiny")` loads the trained model in engine/tiny/model/ (a diffusers
folder, package data) through the same code path as any SD 1.5 folder. It was trained on the
procedural world of engine/tiny/world.py by engine/tiny/train.py; docs/tiny.md records how.

Where that folder is absent (a checkout without the weights), it builds a RANDOMLY INITIALIZED
model of a small SD layout from the configs below and says so: the images it makes are not
meaningful, but every code path (tokenizer, text encoder, UNet, VAE, scheduler) is the real one.
Tests build the same random model with fixed seeds.
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "tokenizer")  # the real CLIP BPE vocabulary (MIT, see LICENSE)
SHIPPED_DIR = os.path.join(HERE, "model")

# SD layout in miniature: attn1 + attn2 in down, mid and up blocks; text width = cross_attention_dim.
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_random_model(path: str, *, seed: int = 0, unet_config: dict | None = None) -> str:
    """Write a randomly initialized SD-layout diffusers folder to `path` (float32); return `path`.

    Deterministic in `seed`. `unet_config` overrides entries of UNET_CONFIG (e.g. a wider model
    for benchmarks; keep cross_attention_dim equal to the text width).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    ucfg = {**UNET_CONFIG, **(unet_config or {})}
    tcfg = {**TEXT_CONFIG, "hidden_size": ucfg["cross_attention_dim"]}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**ucfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**tcfg))
    with torch.no_grad():  # a fresh LayerNorm (weight 1, bias 0) puts every encoding in the
        # hyperplane sum(e) = 0, making the text covariance singular; trained encoders are not so.
        text_encoder.final_layer_norm.weight.normal_(1.0, 0.1)
        text_encoder.final_layer_norm.bias.normal_(0.0, 0.1)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_model_dir() -> tuple[str, bool]:
    """Return (folder, trained) for the name "tiny": the shipped model if present, else a
    random-init model built once into the user cache."""
    if os.path.isfile(os.path.join(SHIPPED_DIR, "model_index.json")):
        return SHIPPED_DIR, True
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "impasto", "tiny-random-v1"
    )
    if not os.path.isfile(os.path.join(cache, "model_index.json")):
        tmp = cache + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        build_random_model(tmp, seed=0)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return cache, False


RANDOM_WARNING = (
    "impasto: the miniature model's trained weights are not shipped yet; 'tiny' is a RANDOMLY "
    "INITIALIZED model built from its config, so its images are noise, not pictures."
)


def warn_random() -> None:
    warnings.warn(RANDOM_WARNING, stacklevel=3)
