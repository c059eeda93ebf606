"""impasto.train: adapters trained through the engine's own forward (docs/training.md).

    custom_diffusion(base, images, placeholder=, class_word=, ...) -> TrainResult
    custom_diffusion(..., train_kv=False)      textual inversion (the token row only)
    full_finetune(base, images, ...)           DreamBooth-style full UNet fine-tuning (a baseline)
    perfusion(base, images, super_word=, ...)   Perfusion: key-locked gated rank-1 (a rank1 file)
    encoder(base, steps=, ...)                 an IP-Adapter-layout encoder adapter on the seen world

One loop (core.Trainer / core.train) for every method; a method (core.Method) says what is
trainable, which in-memory adapters each row's conditioning plan folds in, and how the result
is written.
"""

from .core import Batch, Example, Method, TrainResult, Trainer, engine_forward, masked_loss, train
from .custom_diffusion import CustomDiffusion, custom_diffusion
from .finetune import FullFineTune, full_finetune
from .pair import PairCustomization, pair
from .perfusion import Perfusion, perfusion
from .data import TrainInputError, augment, load_images, load_masks
from .encoder import EncoderAdapter, encoder  # noqa: E402 - after .core, which it builds on

__all__ = [
    "Batch",
    "CustomDiffusion",
    "EncoderAdapter",
    "Example",
    "FullFineTune",
    "Method",
    "PairCustomization",
    "Perfusion",
    "TrainInputError",
    "TrainResult",
    "Trainer",
    "augment",
    "custom_diffusion",
    "encoder",
    "engine_forward",
    "full_finetune",
    "load_images",
    "load_masks",
    "masked_loss",
    "pair",
    "perfusion",
    "train",
]
