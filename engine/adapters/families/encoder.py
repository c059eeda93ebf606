"""The `encoder` family (IP-Adapter; Taming Encoder's design): a reference image, encoded once per
request, fed to every attn2 layer through decoupled cross-attention (encoder.py reads the files).

Per attn2 layer, with the same query Q and the adapter's scale λ (attention.py):

    Z = softmax(Q Kᵀ/√d) V + λ · softmax(Q K'ᵀ/√d) V',   K' = c W'_Kᵀ,  V' = c W'_Vᵀ

c = the request's image tokens: the projection of the image encoder's output for every reference
image, concatenated (one joint softmax). The image encoder, the projection and every layer's
K'/V' run in the conditioning plan, once per (adapter, images, branch kind), never per step.
Unconditional branch as the variant defines it: the projection of a zero embedding (base) or of
the encoder's features of a zero image (Plus).
"""

from __future__ import annotations

import os

import torch

from ...api import AdapterInfo
from ...errors import AdapterFormatError, AdapterNameError, RequestError
from .. import encoder as encoder_format
from . import FAMILY_KEY, Family, ImageKV


def layers(store) -> tuple[dict, dict]:
    """({attn2 name: module}, {attn2 name: IP-Adapter key id}) of the base, walked once per store."""

    def make():
        ids = encoder_format.layer_ids(store.unet)
        modules = dict(store.unet.named_modules())
        return {name: modules[name] for name in ids}, ids

    return store.base_value("encoder.layers", make)


def image_encoder(store, folder: str):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) of `folder`, loaded once per store on
    the UNet's device in the engine's dtype."""

    def make():
        cfg = encoder_format.read_encoder_config(folder)
        device = next(store.unet.parameters()).device
        model = encoder_format.load_encoder(folder, device, store.dtype or torch.float32)
        return model, encoder_format.load_processor(folder, store.model_dir, cfg["image_size"])

    return store.base_value(f"encoder.model:{folder}", make)


def default_image_encoder(store, path) -> str | None:
    """The image encoder an adapter file gets without image_encoder=: an `image_encoder/` folder
    beside the file (IP-Adapter's own layout, which diffusers' `load_ip_adapter` reads by default:
    image_encoder_folder="image_encoder" under the adapter's folder), else the base model's
    `image_encoder/`, else None."""
    for folder in (os.path.join(os.path.dirname(os.path.abspath(os.fspath(path))), "image_encoder"),
                   os.path.join(store.model_dir, "image_encoder") if store.model_dir else None):
        if folder is not None and os.path.isdir(folder):
            return folder
    return None


class EncoderFamily(Family):
    name = encoder_format.FAMILY
    image_input = True

    def detect(self, path, metadata) -> bool:
        return metadata.get(FAMILY_KEY) == encoder_format.FAMILY or encoder_format.is_ip_adapter(path)

    def register(self, store, name, path, *, suffix, token, image_encoder=None) -> AdapterInfo:
        if suffix is not None or token is not None:
            raise AdapterNameError(f"{path}: an encoder adapter takes no suffix= or token=")
        folder = image_encoder if image_encoder is not None else default_image_encoder(store, path)
        if folder is None:
            raise AdapterFormatError(f"{path}: an IP-Adapter needs its image encoder: there is no image_encoder/ "
                                     f"folder beside the file and the base model has none, pass image_encoder= a "
                                     f"local CLIPVisionModelWithProjection folder")
        folder = os.path.realpath(os.fspath(folder))
        cfg = encoder_format.read_encoder_config(folder)
        header, _, _ = encoder_format.read_header(path)
        attn2, ids = layers(store)
        encoder_format.validate(header, attn2, ids, cfg, folder)
        return AdapterInfo(
            name=name,
            path=path,
            family=self.name,
            format=header.variant,
            rank=0,
            targets=tuple(ids),
            nbytes=header.nbytes,
            image_tokens=header.tokens,
            image_encoder=folder,
        )

    def load(self, store, info) -> encoder_format.EncoderFile:
        attn2, ids = layers(store)
        cfg = encoder_format.read_encoder_config(info.image_encoder)
        device = next(store.unet.parameters()).device
        return encoder_format.read_file(info.path, attn2, ids, cfg, info.image_encoder, store.dtype, device)

    def check_use(self, adapter, info) -> None:
        if adapter.options:
            raise RequestError(f"adapters: {adapter.name!r} (encoder) takes no options (its image comes from "
                               f"ip_adapter_image=), got {sorted(adapter.options)}")

    def uncond_options(self, options: dict) -> dict:
        return {**options, "uncond": True}

    def image_kv(self, store, rows):
        # what each (adapter, images) needs: its conditional tokens, its unconditional ones, or both
        need: dict[tuple, tuple] = {}
        for row in rows:
            if len(row) > 1:
                raise RequestError(f"adapters: {', '.join(repr(u.name) for u in row)} are all encoder adapters; "
                                   f"a request takes one")
            for use in row:
                images = use.options.get("image")
                if images is None:
                    raise RequestError(f"adapters: {use.name!r} is an encoder adapter; the request needs an "
                                       f"ip_adapter_image")
                need.setdefault((use.name, images), (use.file, set()))[1].add(bool(use.options.get("uncond")))
        planned = {}
        for (name, images), (f, kinds) in need.items():
            for uncond, tokens in _tokens(store, f, images, kinds).items():
                # image tokens [n·T, D] -> every attn2 layer's K', V' [n·T, h], once
                planned[(name, images, uncond)] = {
                    layer: encoder_format.image_kv(tokens, W_k, W_v)
                    for layer, (W_k, W_v) in f.layers.items()
                }
        return [ImageKV(row[0].scale, planned[(row[0].name, row[0].options["image"], bool(row[0].options.get("uncond")))])
                if row else None for row in rows]


def _tokens(store, f: encoder_format.EncoderFile, images, kinds: set) -> dict:
    """{uncond: image tokens, Shape [n·T, D]} for the kinds asked (False: the images; True: the
    variant's unconditional tokens), the image encoder run once for all of them."""
    model, processor = image_encoder(store, f.encoder)
    device = next(model.parameters()).device
    enc_dtype = next(model.parameters()).dtype
    dtype = store.dtype or torch.float32
    px = encoder_format.pixels(processor, images.images).to(device=device, dtype=enc_dtype)
    n = px.shape[0]
    features = {}
    with torch.inference_mode():
        if f.variant == encoder_format.BASE:
            if False in kinds:
                features[False] = model(pixel_values=px).image_embeds
            if True in kinds:  # the zero embedding: no encoder run
                features[True] = torch.zeros(n, model.config.projection_dim, device=device, dtype=enc_dtype)
        else:
            kind_list = sorted(kinds)  # False (the images) first, then True (a zero image)
            batch = torch.cat([torch.zeros_like(px) if k else px for k in kind_list])
            hidden = model(pixel_values=batch, output_hidden_states=True).hidden_states[-2]
            features = dict(zip(kind_list, hidden.split(n)))
        return {k: encoder_format.project(f, x.to(dtype)).reshape(n * f.tokens, -1) for k, x in features.items()}
