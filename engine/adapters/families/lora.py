"""The `lora` family: LoRA files of every layout (lora_formats.py), served per row by the
LoRA slot pools on the UNet and, for their text-encoder layers, by the plan's text-encoder
runtime. It claims every file no other family claims."""

from __future__ import annotations

import torch

from ...api import AdapterInfo
from ...errors import AdapterError, AdapterShapeError, AdapterValueError
from .. import files, lora_formats, lora_variants
from ..lora import validate_lora_header
from ..lora_formats import read_lora, read_lora_header
from . import Family


class TextEncoderLora:
    """A LoRA file's text-encoder layers ({module: LoraLayer}), applied by the plan."""

    def __init__(self, layers: dict):
        self.layers = layers


def module_names(store) -> set:
    """The base UNet's module names, walked once per store: every LoRA header is resolved against them."""
    return store.base_value("lora.module_names", lambda: set(dict(store.unet.named_modules())))


class LoraFamily(Family):
    name = "lora"
    lora_like = True
    suffix_key = None  # the header metadata key holding a default prompt suffix (style)

    def detect(self, path, metadata) -> bool:
        return True  # the fallback: asked last, takes what no other family claims

    def register(self, store, name, path, *, suffix, token) -> AdapterInfo:
        header = read_lora_header(path, module_names(store))
        validate_lora_header(header, store.targets, store.max_rank, store.all_targets)
        if header.variants:
            lora_variants.validate(header, store)
        if header.text_encoder_keys:
            _text_encoder_entries(store, header.path, header.text_encoder_keys, header.metadata)
        if suffix is None and self.suffix_key:
            suffix = header.metadata.get(self.suffix_key)
        return AdapterInfo(
            name=name,
            path=path,
            family=self.name,
            format=header.format,
            # the pool rank (slot buckets are sized by it); a file without pool layers: its variants' rank
            rank=max((layer.rank for layer in header.layers.values()),
                     default=max((v.rank for v in header.variants.values()), default=0)),
            targets=tuple(sorted({*header.layers, *header.variants})),
            nbytes=header.nbytes,
            token=token,
            suffix=suffix,
        )

    def load(self, store, info) -> lora_formats.LoraFile:
        lora = read_lora(info.path, module_names(store), dtype=store.dtype or torch.float32)
        if {*lora.layers, *lora.variants} != set(info.targets):
            raise AdapterError(f"{info.path}: file changed since registration (targets differ)")
        lora.text_encoder = _text_encoder_lora(store, lora)
        return lora

    def lora_rows(self, name, scale, file) -> list[tuple[str, float]]:
        # a text-encoder-only file has no UNet rows (the plan applies its text-encoder part)
        return [(name, scale)] if file.layers or file.variants else []

    def text_encoder_lora(self, file):
        return file.text_encoder


def _text_encoder_entries(store, path, keys, metadata) -> dict:
    """{text-encoder module: (down key, up key, scale)}, checked against the text encoder."""
    src = files.WeightsFile(path)
    alpha_keys = [k for k in keys if k.endswith(".alpha")]
    alphas = {k: float(v) for k, v in src.tensors(alpha_keys).items()} if alpha_keys else {}
    entries = lora_formats.text_encoder_lora_layers(
        path, {k: src.shape(k) for k in keys}, metadata, store.te_targets, alphas
    )
    for module, (down, up, _) in entries.items():
        k, n = store.te_targets[module]
        if (src.shape(down)[1], src.shape(up)[0]) != (k, n):
            raise AdapterShapeError(f"{path}: text-encoder module {module!r} is {k}->{n}, the adapter has "
                                    f"{src.shape(down)[1]}->{src.shape(up)[0]}")
        if src.shape(down)[0] > store.max_rank:
            raise AdapterValueError(f"{path}: text-encoder module {module!r} has rank {src.shape(down)[0]}, "
                                    f"above max_rank={store.max_rank}")
    return entries


def _text_encoder_lora(store, lora) -> TextEncoderLora | None:
    """The file's text-encoder LoRA as {module: LoraLayer} (None without one), values checked."""
    if not lora.text_encoder_layers:
        return None
    tensors = lora.text_encoder_layers
    alphas = {k: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
    entries = lora_formats.text_encoder_lora_layers(
        lora.path, {k: tuple(v.shape) for k, v in tensors.items()}, lora.metadata, store.te_targets, alphas
    )
    dtype = store.dtype or torch.float32
    layers = {}
    for module, (down, up, scale) in entries.items():
        d, u = tensors[down].to(dtype), tensors[up].to(dtype)
        for key, t in ((down, d), (up, u)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterValueError(f"{lora.path}: tensor {key!r} holds NaN or Inf")
        layers[module] = lora_formats.LoraLayer(down=d, up=u, scale=scale)
    return TextEncoderLora(layers)
