"""Load a Stable-Diffusion-layout base model from a local diffusers folder or an original-layout
(A1111 / ComfyUI) SD 1.x single-file checkpoint. Never the network.

A single file is converted by diffusers' `from_single_file` with component configs that ship in
impasto (engine/configs/sd-v1/: SD 1.5's values, JSON, no weights) or the configs of a diffusers
folder given as `config=`; the tokenizer is impasto's copy of CLIP's BPE vocabulary.
"""

from __future__ import annotations

import functools
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


def load_base_model(path: str, *, device, dtype, scheduler=None, config=None) -> BaseModel:
    """Read unet, text_encoder, tokenizer, vae and scheduler from `path` (local files only): a
    diffusers folder, or a single-file checkpoint (`load_single_file`, `config` its configs).

    A missing or malformed component raises ModelLoadError naming it.
    """
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    if os.path.isfile(path):
        return load_single_file(path, device=device, dtype=dtype, scheduler=scheduler, config=config)
    if config is not None:
        raise ModelLoadError(f"config: {config!r} is for single-file checkpoints; {path!r} is not one")
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

    load = functools.partial(_component, path, "loaded")

    kw = dict(local_files_only=True, torch_dtype=dtype)
    unet = load("unet", lambda: diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw))
    vae = load("vae", lambda: diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", **kw))
    text_encoder = load("text_encoder", lambda: CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw))
    tokenizer = load("tokenizer", lambda: _load_tokenizer(CLIPTokenizer, os.path.join(path, "tokenizer")))
    folder_scheduler = load("scheduler", lambda: _load_scheduler(diffusers, os.path.join(path, "scheduler")))
    sched = load("scheduler", lambda: resolve_scheduler(scheduler, folder_scheduler))

    return _finish(path, unet, text_encoder, tokenizer, vae, sched, device)


def _component(path: str, how: str, name: str, fn):
    """fn()'s component, any library failure raised as a ModelLoadError naming the file and the component."""
    try:
        return fn()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any library failure becomes a named load error
        raise ModelLoadError(f"{path}: component {name!r} could not be {how}: {type(e).__name__}: {e}") from e


def _finish(path, unet, text_encoder, tokenizer, vae, sched, device) -> BaseModel:
    """Check that the components fit together; eval mode, gradients off, on `device`."""
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


# ------------------------------------------------------------------ single-file checkpoints
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SD1_CONFIG = os.path.join(CONFIGS, "sd-v1")
_UNET, _VAE, _TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


def checkpoint_kind(keys) -> str:
    """Semantics: what a weights file is, from its tensor names alone:
      "sd1"  original SD 1.x layout (model.diffusion_model.*, first_stage_model.*, CLIP ViT-L text
             encoder under cond_stage_model.transformer.*)
    anything else is a ModelLoadError saying what the file is (SDXL, SD 2.x, an adapter, one
    diffusers component, a partial checkpoint, or not a Stable Diffusion checkpoint)."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders."):
        raise ModelLoadError("an SDXL single-file checkpoint; SDXL is not supported yet (SD 1.x checkpoints only)")
    if has("cond_stage_model.model."):
        raise ModelLoadError("an SD 2.x single-file checkpoint (OpenCLIP text encoder); single files are read for "
                             "SD 1.x only: convert it to a diffusers folder")
    if any("lora_" in k or ".lora." in k or k.startswith(("lora_unet", "lora_te")) for k in keys[:1000]):
        raise ModelLoadError("a LoRA adapter file, not a model: register it with engine.adapters.register")
    if has(_UNET):
        missing = [what for prefix, what in ((_VAE, "VAE (first_stage_model.*)"),
                                             (_TEXT, "text encoder (cond_stage_model.transformer.*)")) if not has(prefix)]
        if missing:
            raise ModelLoadError(f"an SD 1.x checkpoint without its {' and '.join(missing)}; impasto reads complete "
                                 f"checkpoints only")
        return "sd1"
    if has("conv_in.") or has("down_blocks.") or has("text_model."):
        raise ModelLoadError("the weights of one diffusers component (unet/, vae/ or text_encoder/); give the model "
                             "folder that holds it")
    shown = sorted({k.split(".")[0] for k in keys})[:5]
    raise ModelLoadError(f"not a Stable Diffusion checkpoint (top-level names {shown})")


def _read_checkpoint(path: str) -> dict:
    """{name: tensor} of a single-file checkpoint, through the file layer (pickles weights-only;
    A1111's .ckpt nests them under "state_dict"); named before its tensors are read."""
    from .adapters import files
    from .errors import ImpastoError

    try:
        src = files.WeightsFile(path, nested=True)
        keys = src.keys()
        prefix = "state_dict/" if any(k.startswith("state_dict/") for k in keys) else ""
        names = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        checkpoint_kind(names)  # refuse before reading gigabytes
        tensors = src.tensors([prefix + n for n in names])
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    except ImpastoError as e:
        raise ModelLoadError(f"{path}: not a readable checkpoint: {e}") from None
    return {n: tensors[prefix + n] for n in names}


def load_single_file(path: str, *, device, dtype, scheduler=None, config=None) -> BaseModel:
    """Semantics: the SD 1.x base model in the original-layout file `path` (.safetensors, or a
    weights-only .ckpt/.pt), each component converted by diffusers' single-file loaders offline:
      unet, vae      Cls.from_single_file(checkpoint, config=config, subfolder=...) (UNet
                     in_channels from the checkpoint: 9 for an inpainting checkpoint)
      text_encoder   create_diffusers_clip_model_from_ldm (CLIPTextModel)
      tokenizer      config/tokenizer/ when it has one, else impasto's CLIP BPE copy
      scheduler      config/scheduler/
    `config`: a diffusers folder whose configs (never its weights) describe the checkpoint;
    default: SD 1.5's, shipped with impasto. ModelLoadError naming what is wrong otherwise.
    """
    import diffusers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    from . import tiny

    config = SD1_CONFIG if config is None else os.fspath(config)
    if not os.path.isdir(config):
        raise ModelLoadError(f"config: {config!r} is not a folder of diffusers configs (impasto never downloads)")
    checkpoint = _read_checkpoint(path)
    conv_in = checkpoint.get(_UNET + "input_blocks.0.0.weight")

    load = functools.partial(_component, path, f"converted with the configs of {config}")

    kw = dict(config=config, local_files_only=True, torch_dtype=dtype)
    extra = {"in_channels": int(conv_in.shape[1])} if conv_in is not None and conv_in.dim() == 4 else {}
    unet = load("unet", lambda: diffusers.UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **kw,
                                                                                 **extra))
    vae = load("vae", lambda: diffusers.AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **kw))
    text_encoder = load("text_encoder", lambda: create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, subfolder="text_encoder", **kw))
    folder = os.path.join(config, "tokenizer")
    folder = folder if os.path.isfile(os.path.join(folder, "vocab.json")) else tiny.TOKENIZER_DIR
    tokenizer = load("tokenizer", lambda: _load_tokenizer(CLIPTokenizer, folder))
    folder_scheduler = load("scheduler", lambda: _load_scheduler(diffusers, os.path.join(config, "scheduler")))
    sched = load("scheduler", lambda: resolve_scheduler(scheduler, folder_scheduler))
    return _finish(path, unet, text_encoder, tokenizer, vae, sched, device)
