"""Full UNet fine-tuning (DreamBooth-style: every UNet weight trained, Ruiz et al. 2023) on the
same loop: the baseline Custom Diffusion is measured against (docs/training.md).

The placeholder's row stays fixed at its initial embedding (DreamBooth binds a rare identifier
token and does not train the text encoder); the UNet's own weights become the trained tensors,
so the engine given is changed in place: use an engine of its own. No rescale augmentation
(DreamBooth has none). Written: `unet/` (diffusers save_pretrained) and `<placeholder>.safetensors`.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from ..adapters import kv as kv_format
from ..adapters.families import FAMILIES, Use
from ..api import AdapterInfo
from .core import Method, Trainer, train
from .custom_diffusion import concept_examples, resolve_engine
from .data import TrainInputError


class FullFineTune(Method):
    name = "full_finetune"
    aug = False

    def __init__(self, engine, placeholders: dict[str, torch.Tensor]):
        if engine.dtype != torch.float32:
            raise TrainInputError("full fine-tuning trains the UNet's own weights: the engine must be float32")
        self.unet = engine.base.unet
        self.params = dict(self.unet.named_parameters())
        for p in self.params.values():
            p.requires_grad_(True)
        self.tokens = {p: e.detach().float().clone() for p, e in placeholders.items()}
        self._info = AdapterInfo(name="<training>", path="<training>", family="kv", format="diffusers", rank=0,
                                 targets=(), nbytes=0, token=next(iter(self.tokens), None),
                                 token_map=tuple((p, p) for p in self.tokens))

    def parameters(self):
        return self.params

    def uses(self):
        file = kv_format.KvFile(path="<training>", format="diffusers", layers={}, tokens=self.tokens)
        return [Use(FAMILIES["kv"], self._info.name, 1.0, {}, self._info, file)]

    def write(self, engine, output):
        folder = os.path.join(output, "unet")
        self.unet.save_pretrained(folder)
        files = {"unet": os.path.join(folder, "diffusion_pytorch_model.safetensors")}
        # the placeholder as a Custom Diffusion folder whose K/V are the fine-tuned UNet's own
        # (delta 0 on this engine): what lets the fine-tuned engine serve "<new1> ..." prompts
        state = {}
        for name, (wk, wv) in kv_format.base_kv_weights(self.unet).items():
            state[f"{name}.processor.to_k_custom_diffusion.weight"] = wk.float().contiguous()
            state[f"{name}.processor.to_v_custom_diffusion.weight"] = wv.float().contiguous()
        files["weights"] = os.path.join(output, "pytorch_custom_diffusion_weights.safetensors")
        save_file(state, files["weights"], metadata={"format": "pt"})
        for p, t in self.tokens.items():
            files[p] = os.path.join(output, f"{p}.safetensors")
            save_file({p: t.contiguous()}, files[p], metadata={"format": "pt"})
        return files


def full_finetune(base, images, *, placeholder="<new1>", class_word, masks=None, steps=250, lr=5e-6,
                  batch_size=4, prior_images=None, num_prior=0, prior_weight=1.0, seed=0, output, progress=True,
                  resume=False, checkpoint_every=0, init_token="sks", max_grad_norm=1.0, captions=None):
    """DreamBooth-style full UNet fine-tuning through the engine; `base` is changed in place when
    it is an Engine. lr is used as given (DreamBooth: 5e-6, no batch scaling). captions: None (every
    image "a {placeholder} {class_word}") or one prompt per image, as custom_diffusion takes them,
    so the baseline can be given the same data and prompts."""
    engine, owned = resolve_engine(base)
    try:
        concepts = [{"images": images, "placeholder": placeholder, "class_word": class_word, "masks": masks}]
        examples, rows = concept_examples(engine, concepts, prompt_template=None, num_prior=num_prior,
                                          prior_images=prior_images, seed=seed, init=init_token,
                                          captions=captions)
        trainer = Trainer(engine, FullFineTune(engine, rows), examples, steps=steps, lr=lr, batch_size=batch_size,
                          prior_weight=prior_weight, seed=seed, max_grad_norm=max_grad_norm, weight_decay=1e-2)
        return train(trainer, os.fspath(output), checkpoint_every=checkpoint_every, resume=resume,
                     progress=progress)
    finally:
        if owned:
            engine.close()
