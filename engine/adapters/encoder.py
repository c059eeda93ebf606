"""IP-Adapter files (family `encoder`): the two layouts, the image projection, the Resampler and
the image-encoder folder, read and checked here; the family (families/encoder.py) plans them.

A file holds two groups, as tencent-ailab/IP-Adapter and diffusers write them:

    .safetensors   image_proj.<key>, ip_adapter.<id>.to_{k,v}_ip.weight        (flat, prefixed)
    .bin           {"image_proj": {<key>: ...}, "ip_adapter": {"<id>.to_k_ip.weight": ...}}
                   (nested; read with torch.load(weights_only=True) only)

`<id>` = 2k + 1 for the k-th cross-attention layer in `unet.attn_processors` order (diffusers'
`key_id += 2`): down blocks, up blocks, mid block. Two image projections (research methods.md §4.2):

    base  proj.weight [T·D, E], proj.bias [T·D], norm.{weight,bias} [D]
          tokens = LayerNorm_D(reshape(proj(e), [T, D])),  e = image_embeds [E] (projection_dim)
    plus  latents [1, T, W], proj_in [W, E], proj_out [D, W], norm_out [D],
          layers.{i}.0.{norm1,norm2} [W], .to_q [H·64, W], .to_kv [2·H·64, W], .to_out [W, H·64],
          layers.{i}.1.{0 (LayerNorm W), 1 [F, W], 3 [W, F]}  (no biases in attention or FF)
          tokens = Resampler(hidden_states[-2] [P, E])  (E = the encoder's hidden_size)

Letters: T image tokens per image, D cross_attention_dim (the text width), E the encoder's
width the projection reads, W the Resampler's width, H heads of 64 channels (every released
Plus file; diffusers assumes the same), F its feed-forward width, P the encoder's patches + 1.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import AdapterError, AdapterFormatError, AdapterShapeError, AdapterUnsupportedError, AdapterValueError
from . import files

FAMILY = "encoder"
BASE, PLUS = "ip-adapter", "ip-adapter-plus"
DIM_HEAD = 64
LN_EPS = 1e-5  # nn.LayerNorm's default, as both the original and diffusers build them
MAX_TOKENS_PER_IMAGE = 64  # released files: 4 (base), 16 (Plus); bounds the batch state's image axis
MAX_DEPTH = 16  # Resampler blocks (released: 4)
_MAX_CONFIG_BYTES = 1 << 20
_MAX_PICKLE_INDEX_BYTES = 16 << 20
_IP_KEY = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")


# ---------------------------------------------------------------------------------------------
# The attention layers a file addresses.
# ---------------------------------------------------------------------------------------------


def layer_ids(unet) -> dict[str, int]:
    """{attn2 module name: the IP-Adapter key id of its K'/V'}, as diffusers' loader numbers them:
    every processor that is not an attn1 is a cross-attention layer, ids 1, 3, 5, ... in
    `unet.attn_processors` order."""
    names = [n[: -len(".processor")] for n in unet.attn_processors if not n.endswith("attn1.processor")]
    return {name: 2 * k + 1 for k, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# Detection and the header.
# ---------------------------------------------------------------------------------------------


def is_ip_adapter(path) -> bool:
    """Whether `path` holds IP-Adapter weights, judged without loading tensors: a safetensors
    header with `image_proj.` and `ip_adapter.` keys, or a torch zip whose pickle names both groups."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    try:
        if not path.endswith(files.PICKLE_SUFFIXES) or files.looks_like_safetensors(path):
            with files.opened(path) as f:  # the JSON header only: detection runs for every file registered
                _, keys = files._parse_header(path, f)
            return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)
        with files.opened(path) as f, zipfile.ZipFile(f) as z:
            index = [i for i in z.infolist() if i.filename.endswith("data.pkl")]
            if len(index) != 1 or index[0].file_size > _MAX_PICKLE_INDEX_BYTES:
                return False
            data = z.read(index[0])
        return b"image_proj" in data and b"ip_adapter" in data
    except (AdapterError, OSError, zipfile.BadZipFile, ValueError):
        return False


@dataclass(frozen=True)
class EncoderHeader:
    """What registration learns from a file: its variant, shapes and the numbers derived from them."""

    path: str
    variant: str  # BASE or PLUS
    shapes: dict  # "image_proj.<key>" / "ip_adapter.<key>" -> shape
    tokens: int  # T
    embed_dim: int  # E: image_embeds width (base) or encoder hidden width (plus)
    width: int  # D: the tokens' width, the text width of the base
    heads: int = 0  # H (plus)
    depth: int = 0  # Resampler blocks (plus)
    nbytes: int = 0


def _grouped_keys(path: str, src: files.WeightsFile) -> dict[str, str]:
    """{"image_proj.<key>" or "ip_adapter.<key>": the file's own key}, both layouts alike."""
    out, stray = {}, []
    for key in src.keys():
        group, sep, rest = key.replace("/", ".", 1).partition(".")  # nested .bin keys: "image_proj/<key>"
        if group in ("image_proj", "ip_adapter") and sep and rest:
            out[f"{group}.{rest}"] = key
        else:
            stray.append(key)
    if stray:
        raise AdapterFormatError(f"{path}: key {stray[0]!r} is neither image_proj.* nor ip_adapter.* (not an "
                                 f"IP-Adapter file, or one with extra parts)")
    if src.empty or src.others:
        what = (src.empty or list(src.others))[0]
        raise AdapterFormatError(f"{path}: entry {what!r} holds no tensor")
    return out


def read_header(path) -> tuple[EncoderHeader, files.WeightsFile, dict]:
    """(header, the open weights file, {grouped key: file key}) of an IP-Adapter file, its layout
    checked: one known variant, every key it needs and no other, consistent shapes."""
    src = files.WeightsFile(path, nested=True)
    path = src.path
    keys = _grouped_keys(path, src)
    shapes = {k: tuple(src.shape(fk)) for k, fk in keys.items()}
    for k, fk in keys.items():
        if not src.dtype(fk).is_floating_point:
            raise AdapterValueError(f"{path}: tensor {k!r} has dtype {src.dtype(fk)}, expected floating point")
    proj = {k[len("image_proj."):]: s for k, s in shapes.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: s for k, s in shapes.items() if k.startswith("ip_adapter.")}
    if not proj or not ip:
        raise AdapterFormatError(f"{path}: an IP-Adapter file needs both image_proj.* and ip_adapter.* tensors")
    for key in ip:
        if "lora" in key:
            raise AdapterUnsupportedError(f"{path}: {key!r}: IP-Adapter FaceID (with LoRA layers) is not supported")
        if not _IP_KEY.match(key):
            raise AdapterFormatError(f"{path}: ip_adapter key {key!r} is not <id>.to_k_ip.weight / <id>.to_v_ip.weight")
    if "proj.weight" in proj:
        variant, expected, derived = BASE, *_base_layout(path, proj)
    elif "latents" in proj:
        variant, expected, derived = PLUS, *_plus_layout(path, proj)
    elif "proj.0.weight" in proj or "perceiver_resampler.proj_in.weight" in proj:
        raise AdapterUnsupportedError(f"{path}: IP-Adapter Full / FaceID image projections are not supported "
                                      f"(impasto reads the base and Plus variants)")
    else:
        raise AdapterFormatError(f"{path}: image_proj holds neither proj.weight (base) nor latents (Plus)")
    _same_keys(path, "image_proj.", proj, expected)
    nbytes = sum(src.nbytes(fk) for fk in keys.values())
    header = EncoderHeader(path, variant, shapes, nbytes=nbytes, **derived)
    return header, src, keys


def _base_layout(path, proj) -> tuple[dict, dict]:
    out, E = _dims(path, "proj.weight", proj["proj.weight"], 2)
    D = _dims(path, "norm.weight", proj.get("norm.weight", ()), 1)[0]
    if D == 0 or out % D:
        raise AdapterShapeError(f"{path}: image_proj.proj.weight has {out} rows, not a multiple of norm.weight's {D}")
    T = out // D
    expected = {"proj.weight": (out, E), "proj.bias": (out,), "norm.weight": (D,), "norm.bias": (D,)}
    return expected, dict(tokens=T, embed_dim=E, width=D)


def _plus_layout(path, proj) -> tuple[dict, dict]:
    one, T, W = _dims(path, "latents", proj["latents"], 3)
    if one != 1:
        raise AdapterShapeError(f"{path}: image_proj.latents has shape {proj['latents']}, expected [1, T, W]")
    W_in, E = _dims(path, "proj_in.weight", proj.get("proj_in.weight", ()), 2)
    D, W_out = _dims(path, "proj_out.weight", proj.get("proj_out.weight", ()), 2)
    if W_in != W or W_out != W:
        raise AdapterShapeError(f"{path}: the Resampler's width is {W} (latents) but proj_in / proj_out are {W_in} / {W_out}")
    inner = _dims(path, "layers.0.0.to_q.weight", proj.get("layers.0.0.to_q.weight", ()), 2)[0]
    F_ = _dims(path, "layers.0.1.1.weight", proj.get("layers.0.1.1.weight", ()), 2)[0]
    if inner == 0 or inner % DIM_HEAD:
        raise AdapterShapeError(f"{path}: layers.0.0.to_q.weight has {inner} rows, not heads x {DIM_HEAD}")
    blocks = {int(m.group(1)) for k in proj if (m := re.match(r"^layers\.(\d+)\.", k))}
    depth = len(blocks)
    if blocks != set(range(depth)) or not 0 < depth <= MAX_DEPTH:
        raise AdapterShapeError(f"{path}: Resampler blocks {sorted(blocks)[:8]} are not 0..depth-1 with depth <= {MAX_DEPTH}")
    expected = {"latents": (1, T, W), "proj_in.weight": (W, E), "proj_in.bias": (W,), "proj_out.weight": (D, W),
                "proj_out.bias": (D,), "norm_out.weight": (D,), "norm_out.bias": (D,)}
    for i in range(depth):
        p = f"layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            expected[p + n + ".weight"] = (W,)
            expected[p + n + ".bias"] = (W,)
        expected.update({p + "0.to_q.weight": (inner, W), p + "0.to_kv.weight": (2 * inner, W),
                         p + "0.to_out.weight": (W, inner), p + "1.1.weight": (F_, W), p + "1.3.weight": (W, F_)})
    return expected, dict(tokens=T, embed_dim=E, width=D, heads=inner // DIM_HEAD, depth=depth)


def _dims(path, key, shape, ndim) -> tuple:
    if len(shape) != ndim or not all(shape):
        raise AdapterShapeError(f"{path}: image_proj.{key} has shape {tuple(shape)}, expected {ndim} non-zero dims"
                                if shape else f"{path}: image_proj.{key} is missing")
    return tuple(shape)


def _same_keys(path, prefix, got: dict, expected: dict) -> None:
    for key, shape in expected.items():
        if key not in got:
            raise AdapterFormatError(f"{path}: {prefix}{key} is missing")
        if got[key] != shape:
            raise AdapterShapeError(f"{path}: {prefix}{key} has shape {got[key]}, the layout needs {shape}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise AdapterFormatError(f"{path}: {prefix}{extra[0]} is not part of this IP-Adapter layout")


def validate(header: EncoderHeader, attn2: dict, ids: dict, encoder: dict, encoder_path: str) -> None:
    """AdapterShapeError unless the file fits this base (every attn2 layer's K'/V' as wide as its
    to_k / to_v, tokens as wide as the text) and this image encoder (the width it reads)."""
    path = header.path
    if not 0 < header.tokens <= MAX_TOKENS_PER_IMAGE:
        raise AdapterShapeError(f"{path}: {header.tokens} image tokens per image, impasto reads 1..{MAX_TOKENS_PER_IMAGE}")
    if set(ids) != set(attn2):
        raise AdapterShapeError(f"{path}: this base's attention processors are not in IP-Adapter's layout "
                                f"(attn1/attn2 pairs)")
    need = "projection_dim" if header.variant == BASE else "hidden_size"
    enc_width = encoder[need]
    if header.embed_dim != enc_width:
        key = "proj.weight" if header.variant == BASE else "proj_in.weight"
        raise AdapterShapeError(f"{path}: image_proj.{key} reads {header.embed_dim}-wide image features, the image "
                                f"encoder {encoder_path} gives {enc_width} ({need}): an IP-Adapter made for another "
                                f"CLIP image encoder (ViT-H vs ViT-bigG?)")
    ip = {k[len("ip_adapter."):]: s for k, s in header.shapes.items() if k.startswith("ip_adapter.")}
    expected = {}
    for name, key_id in ids.items():
        attn = attn2[name]
        expected[f"{key_id}.to_k_ip.weight"] = (attn.to_k.out_features, header.width)
        expected[f"{key_id}.to_v_ip.weight"] = (attn.to_v.out_features, header.width)
        if attn.to_k.in_features != header.width:
            raise AdapterShapeError(f"{path}: image tokens are {header.width} wide, attn2 {name!r} reads "
                                    f"{attn.to_k.in_features} (an IP-Adapter for another base model)")
    _same_keys(path, "ip_adapter.", ip, expected)


# ---------------------------------------------------------------------------------------------
# The loaded file and its math.
# ---------------------------------------------------------------------------------------------


@dataclass
class EncoderFile:
    """A loaded IP-Adapter: the projection's tensors (keys without "image_proj.") and every attn2
    layer's (W'_K, W'_V), each Shape [h, D], in the engine's dtype."""

    path: str
    variant: str
    tokens: int
    heads: int
    depth: int
    proj: dict
    layers: dict
    encoder: str  # the image-encoder folder


def read_file(path, attn2: dict, ids: dict, encoder: dict, encoder_path: str, dtype, device=None) -> EncoderFile:
    """The whole file, its layout and shapes checked again (as at registration) and every value
    finite; tensors in `dtype` on `device` (the base's: the plan reads them there)."""
    header, src, keys = read_header(path)
    validate(header, attn2, ids, encoder, encoder_path)
    tensors = src.tensors(keys.values())
    by_key = {}
    for k, fk in keys.items():
        t = tensors[fk]
        if not bool(torch.isfinite(t).all()):
            raise AdapterValueError(f"{header.path}: tensor {k!r} holds NaN or Inf")
        by_key[k] = t.to(device=device, dtype=dtype or torch.float32).contiguous()
    proj = {k[len("image_proj."):]: t for k, t in by_key.items() if k.startswith("image_proj.")}
    layers = {name: (by_key[f"ip_adapter.{i}.to_k_ip.weight"], by_key[f"ip_adapter.{i}.to_v_ip.weight"])
              for name, i in ids.items()}
    return EncoderFile(header.path, header.variant, header.tokens, header.heads, header.depth, proj, layers,
                       encoder_path)


def project(f: EncoderFile, features: torch.Tensor) -> torch.Tensor:
    """Semantics: the image tokens of N images, Shape [N, T, D].

    base: features = image_embeds, Shape [N, E]:  LayerNorm(reshape(features @ proj.weightᵀ + proj.bias, [N, T, D]))
    plus: features = hidden_states[-2], Shape [N, P, E]:  the Resampler (`resampler`).
    """
    p = f.proj
    if f.variant == BASE:
        x = F.linear(features, p["proj.weight"], p["proj.bias"]).reshape(features.shape[0], f.tokens, -1)
        return F.layer_norm(x, x.shape[-1:], p["norm.weight"], p["norm.bias"], LN_EPS)
    return resampler(p, features, heads=f.heads, depth=f.depth)


def resampler(p: dict, x: torch.Tensor, *, heads: int, depth: int) -> torch.Tensor:
    """IP-Adapter Plus's Resampler (a Perceiver), written from the original `resampler.py`.

    Semantics, x Shape [N, P, E] -> Shape [N, T, D], with latents l = p["latents"] ([1, T, W]):
        x = proj_in(x)
        per block i:  a, b = LN_norm1(x), LN_norm2(l)
                      q = b W_qᵀ;  k, v = split([a; b] W_kvᵀ)      (keys: the features and the latents)
                      l = softmax(q kᵀ / √64) v W_outᵀ + l          (per head, H heads of 64)
                      l = W_3 GELU(W_1 LN_0(l)) + l
        out = LN_norm_out(proj_out(l))
    """
    N = x.shape[0]
    lat = p["latents"].expand(N, -1, -1)
    x = F.linear(x, p["proj_in.weight"], p["proj_in.bias"])
    W = lat.shape[-1]
    for i in range(depth):
        q_ = f"layers.{i}.0."
        a = F.layer_norm(x, (W,), p[q_ + "norm1.weight"], p[q_ + "norm1.bias"], LN_EPS)
        b = F.layer_norm(lat, (W,), p[q_ + "norm2.weight"], p[q_ + "norm2.bias"], LN_EPS)
        q = F.linear(b, p[q_ + "to_q.weight"])
        k, v = F.linear(torch.cat([a, b], dim=1), p[q_ + "to_kv.weight"]).chunk(2, dim=-1)
        split = lambda t: t.reshape(N, t.shape[1], heads, DIM_HEAD).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        lat = F.linear(o.transpose(1, 2).reshape(N, -1, heads * DIM_HEAD), p[q_ + "to_out.weight"]) + lat
        f_ = f"layers.{i}.1."
        h = F.layer_norm(lat, (W,), p[f_ + "0.weight"], p[f_ + "0.bias"], LN_EPS)
        lat = F.linear(F.gelu(F.linear(h, p[f_ + "1.weight"])), p[f_ + "3.weight"]) + lat
    out = F.linear(lat, p["proj_out.weight"], p["proj_out.bias"])
    return F.layer_norm(out, out.shape[-1:], p["norm_out.weight"], p["norm_out.bias"], LN_EPS)


def image_kv(tokens: torch.Tensor, W_k: torch.Tensor, W_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantics: K' = tokens @ W'_Kᵀ, V' = tokens @ W'_Vᵀ for one attn2 layer.

    tokens: Shape [L, D] (every image's T tokens, image-major); W_k, W_v: Shape [h, D].
    Returns K', V', each Shape [L, h].
    """
    return tokens @ W_k.t(), tokens @ W_v.t()


# ---------------------------------------------------------------------------------------------
# The image encoder folder: a local CLIPVisionModelWithProjection.
# ---------------------------------------------------------------------------------------------


def read_encoder_config(folder) -> dict:
    """The config.json of a CLIPVisionModelWithProjection folder (safetensors weights required:
    impasto never unpickles a model); AdapterFormatError naming the folder and what is wrong."""
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.isfile(cfg_path):
        raise AdapterFormatError(f"{folder}: not an image-encoder folder (no config.json); pass image_encoder= a "
                                 f"local CLIPVisionModelWithProjection folder")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise AdapterFormatError(f"{folder}: the image encoder needs model.safetensors (impasto never unpickles models)")
    if os.path.getsize(cfg_path) > _MAX_CONFIG_BYTES:
        raise AdapterFormatError(f"{cfg_path}: larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise AdapterFormatError(f"{cfg_path}: not a readable JSON config: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{cfg_path}: not a JSON object")
    for key in ("hidden_size", "projection_dim", "image_size"):
        v = cfg.get(key)
        if type(v) is not int or v <= 0:
            raise AdapterFormatError(f"{cfg_path}: {key} is {v!r}, expected a positive integer (a "
                                     f"CLIPVisionModelWithProjection config)")
    return cfg


def load_encoder(folder: str, device, dtype):
    """The CLIPVisionModelWithProjection in `folder` (local files, safetensors), eval, frozen."""
    from transformers import CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                              dtype=dtype)
    except Exception as e:  # noqa: BLE001 - any library failure is this folder's
        raise AdapterFormatError(f"{folder}: the image encoder could not be loaded: {type(e).__name__}: {e}") from e
    return model.to(device).eval().requires_grad_(False)


def load_processor(folder: str, model_dir: str | None, image_size: int):
    """The CLIPImageProcessor a diffusers pipeline of `model_dir` would use: its
    feature_extractor/ folder, else the encoder folder's preprocessor_config.json, else the one
    `load_ip_adapter` makes (CLIP mean/std, resize and centre crop to the encoder's image_size)."""
    import transformers
    from transformers import CLIPImageProcessor

    places = ([os.path.join(model_dir, "feature_extractor")] if model_dir else []) + [folder]
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "no torchvision, the PIL processor": the same numbers
    try:
        for where in places:
            if os.path.isfile(os.path.join(where, "preprocessor_config.json")):
                return CLIPImageProcessor.from_pretrained(where, local_files_only=True)
        return CLIPImageProcessor(size=image_size, crop_size=image_size)
    finally:
        transformers.logging.set_verbosity(verbosity)


def pixels(processor, images) -> torch.Tensor:
    """Shape [N, 3, S, S]: `images` (PIL) as the processor prepares them."""
    return processor(list(images), return_tensors="pt").pixel_values


# ---------------------------------------------------------------------------------------------
# Writing (fixtures, training output): the ecosystem's own layouts.
# ---------------------------------------------------------------------------------------------


def initial_weights(unet, embed_dim: int, *, tokens: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) of a fresh base-variant adapter, as IP-Adapter's tutorial_train.py
    starts one: every to_k_ip / to_v_ip a copy of its layer's to_k / to_v, the projection a
    default-initialized Linear(embed_dim -> tokens·D) and a LayerNorm (ones, zeros). float32."""
    D = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    proj = torch.nn.Linear(embed_dim, tokens * D)
    image_proj = {"proj.weight": proj.weight.detach().clone(), "proj.bias": proj.bias.detach().clone(),
                  "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)}
    modules = dict(unet.named_modules())
    ip_adapter = {}
    for name, key_id in layer_ids(unet).items():
        attn = modules[name]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = attn.to_k.weight.detach().float().clone()
        ip_adapter[f"{key_id}.to_v_ip.weight"] = attn.to_v.weight.detach().float().clone()
    return image_proj, ip_adapter


def initial_plus_weights(unet, embed_dim: int, *, tokens: int = 16, depth: int = 2, heads: int = 1,
                         width: int | None = None, ff_mult: int = 4, seed: int = 0) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) of a fresh Plus-variant adapter in the original Resampler's key
    layout (`resampler`): latents ~ N(0, 1)/√W as IP-Adapter's resampler.py starts them, every
    Linear default-initialized, LayerNorms (ones, zeros); K'/V' copies of to_k / to_v as in
    `initial_weights`. W = width (default D, the cross-attention width). float32."""
    D = unet.config.cross_attention_dim
    W, inner, F_ = width or D, heads * DIM_HEAD, ff_mult * (width or D)
    torch.manual_seed(seed)
    lin = lambda o, i, bias=True: torch.nn.Linear(i, o, bias=bias)  # noqa: E731
    p = {"latents": torch.randn(1, tokens, W) / W ** 0.5}
    m = lin(W, embed_dim)
    p["proj_in.weight"], p["proj_in.bias"] = m.weight.detach(), m.bias.detach()
    for i in range(depth):
        q = f"layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            p[q + n + ".weight"], p[q + n + ".bias"] = torch.ones(W), torch.zeros(W)
        p[q + "0.to_q.weight"] = lin(inner, W, False).weight.detach()
        p[q + "0.to_kv.weight"] = lin(2 * inner, W, False).weight.detach()
        p[q + "0.to_out.weight"] = lin(W, inner, False).weight.detach()
        p[q + "1.1.weight"] = lin(F_, W, False).weight.detach()
        p[q + "1.3.weight"] = lin(W, F_, False).weight.detach()
    m = lin(D, W)
    p["proj_out.weight"], p["proj_out.bias"] = m.weight.detach(), m.bias.detach()
    p["norm_out.weight"], p["norm_out.bias"] = torch.ones(D), torch.zeros(D)
    _, ip_adapter = initial_weights(unet, embed_dim, tokens=1, seed=seed)
    return {k: v.clone().float() for k, v in p.items()}, ip_adapter


def save(path, image_proj: dict, ip_adapter: dict) -> None:
    """Write an IP-Adapter file: `.safetensors` flat with prefixes, anything else as the nested
    torch dict the original repo saves ({"image_proj": ..., "ip_adapter": ...})."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        flat = {f"image_proj.{k}": v.contiguous() for k, v in image_proj.items()}
        flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in ip_adapter.items()})
        save_file(flat, path)
    else:
        buf = io.BytesIO()
        torch.save({"image_proj": dict(image_proj), "ip_adapter": dict(ip_adapter)}, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())

