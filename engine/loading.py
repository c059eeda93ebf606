"""Load a Stable-Diffusion-layout base model from a local diffusers folder. Never the network."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .errors import ModelLoadError

COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")


@dataclass
class BaseModel:
    """The frozen components of a base model, in eval mode, gradients off."""

    path: str
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    vae: torch.nn.Module
    scheduler: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def inpainting(self) -> bool:
        """An inpainting UNet: its input is [latents, mask, masked-image latents] (2C + 1 channels)."""
        return self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1


def resolve_scheduler(scheduler, folder_scheduler):
    """None -> the folder's; a diffusers scheduler instance; or a class name such as
    "DPMSolverMultistepScheduler", built from the folder's scheduler config."""
    import diffusers

    if scheduler is None:
        return folder_scheduler
    if isinstance(scheduler, str):
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config") or not hasattr(cls, "step"):
            raise ModelLoadError(f"scheduler: {scheduler!r} is not a diffusers scheduler class")
        return cls.from_config(folder_scheduler.config)
    if hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step"):
        return scheduler
    raise ModelLoadError(f"scheduler: expected None, a class name or a diffusers scheduler, got {scheduler!r}")


def load_base_model(path: str, *, device, dtype, scheduler=None) -> BaseModel:
    """Read unet, text_encoder, tokenizer, vae and scheduler from `path` (local files only).

    A missing or malformed component raises ModelLoadError naming it.
    """
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    if os.path.isfile(path):  # say what the file is rather than "does not exist"
        kind = os.path.splitext(path)[1].lower()
        what = ("a single-file checkpoint (A1111 / ComfyUI layout)" if kind in (".safetensors", ".ckpt", ".pt", ".bin")
                else "a file")
        raise ModelLoadError(f"{path!r} is {what}; single-file checkpoints are not supported yet: give a diffusers "
                             f"folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/)")
    if not os.path.isdir(path):
        raise ModelLoadError(f"model folder {path!r} does not exist (impasto never downloads models)")
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                pipeline = json.load(f).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            pipeline = ""
        if "XL" in pipeline or os.path.isdir(os.path.join(path, "text_encoder_2")):
            raise ModelLoadError(f"{path}: an SDXL model ({pipeline or 'text_encoder_2/'}); SDXL is not supported yet "
                                 f"(SD 1.x / 2.x layouts only)")
    for name in COMPONENTS:
        if not os.path.isdir(os.path.join(path, name)):
            raise ModelLoadError(f"{path}: component {name!r} is missing (expected the folder {name}/)")

    def load(name, fn):
        try:
            return fn()
        except ModelLoadError:
            raise
        except Exception as e:  # noqa: BLE001 - any library failure becomes a named load error
            raise ModelLoadError(f"{path}: component {name!r} could not be loaded: {type(e).__name__}: {e}") from e

    kw = dict(local_files_only=True, torch_dtype=dtype)
    unet = load("unet", lambda: diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw))
    vae = load("vae", lambda: diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **kw))
    text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw))
    tokenizer = load("tokenizer", lambda: _load_tokenizer(CLIPTokenizer, os.path.join(path, "tokenizer")))
    folder_scheduler = load("scheduler", lambda: _load_scheduler(diffusers, os.path.join(path, "scheduler")))
    sched = load("scheduler", lambda: resolve_scheduler(scheduler, folder_scheduler))

    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"{path}: text_encoder hidden_size {text_encoder.config.hidden_size} != "
            f"unet cross_attention_dim {unet.config.cross_attention_dim}"
        )
    C = vae.config.latent_channels
    if unet.config.in_channels not in (C, 2 * C + 1):  # 2C + 1: an inpainting UNet
        raise ModelLoadError(
            f"{path}: unet in_channels {unet.config.in_channels} fits neither vae latent_channels {C} nor an "
            f"inpainting UNet's 2 x {C} + 1"
        )
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return BaseModel(path, unet, text_encoder, tokenizer, vae, sched)


def _load_tokenizer(cls, folder):
    tok = cls.from_pretrained(folder, local_files_only=True)
    if tok.model_max_length > 1024:  # transformers' "unset" sentinel is ~1e30; SD pads to 77
        tok.model_max_length = 77
    if len(tok) < 3:
        raise ModelLoadError(f"{folder}: tokenizer has {len(tok)} tokens (vocab.json/merges.txt not read)")
    return tok


def _load_scheduler(diffusers, folder):
    cfg_path = os.path.join(folder, "scheduler_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cls = getattr(diffusers, cfg.get("_class_name", ""), None)
    if cls is None:
        raise ModelLoadError(f"{cfg_path}: unknown scheduler class {cfg.get('_class_name')!r}")
    return cls.from_config(cfg)
