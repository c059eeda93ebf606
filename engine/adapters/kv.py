"""Custom Diffusion (``kv`` family) files: readers, SVD compression, impasto's ``kv`` file, closed-form merge.

Custom Diffusion (Kumari et al. 2023) fine-tunes W_k and W_v of every cross-attention layer
(``attn2``) and learns one or more modifier-token embeddings (``<new1>`` ...). From a file the
engine needs, per ``attn2`` module, the change of W_k and W_v relative to the frozen base, and the
token vectors. Every layout is read into one normalized form, ``KvFile``.

Semantics:
    for every entry ``layers[name] = KvLayer(...)`` (name: a diffusers attn2 module name,
    e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``):
        W_k'[name] = W_k[name] + layers[name].delta_k()      # Shape: [h, D]
        W_v'[name] = W_v[name] + layers[name].delta_v()      # Shape: [h, D]
        K = c @ W_k'.T,  V = c @ W_v'.T                       # c: text condition [L, D]
    a layer is either dense (``dk``, ``dv`` Shape: [h, D]) or factored
    (``k_factors = (u [h, r], v [r, D])``: delta_k = u @ v; the same for ``v_factors``).
    ``tokens[placeholder]``  Shape: [D_emb], the new row of the CLIP token-embedding table.
    Layers absent from ``layers`` are unchanged (delta 0).
    ``qout[name] = QOutLayer(dq, dout, dbias)`` (diffusers layout with ``--freeze_model crossattn``
    only): W_q' = W_q + dq [h, h_in], W_out' = W_out + dout [h_out, h], b_out' = b_out + dbias [h_out];
    Q and the output projection are per-step (they read the latents), so the engine serves them
    through the per-row LoRA runtime (families/kv.py), not through the planned K/V.
Legend: h = attention width (320/640/1280 in SD 1.5), D = cross_attention_dim (768 in SD 1.5),
D_emb = text-encoder width (equal to D in every SD 1.x/2.x layout; checked), r = rank.

Layouts (``KvFile.format``), each as its tool writes it (docs/formats.md has the details):

======================  ========================================================================
``"diffusers"``         diffusers ``examples/custom_diffusion``: ``unet.save_attn_procs`` writes
                        ``pytorch_custom_diffusion_weights.safetensors`` (or ``.bin``) with
                        ``<attn2>.processor.to_k_custom_diffusion.weight`` / ``to_v_...``: FULL
                        fine-tuned weights (fp32); the ``.bin`` also holds ``<attn1>.processor: {}``.
                        Tokens: one file per token beside it, ``{"<new1>": [D_emb]}``, named
                        ``<new1>.safetensors``, or ``<new1>.bin`` holding a pickle (older script) or
                        safetensors bytes (the current script names its safetensors file ``.bin``);
                        the content decides, not the extension.
``"delta-bin"``         original repo, diffusers flavour: ``delta.bin`` = torch.save of
                        ``{'unet': {'<attn2>.to_k.weight': W', ...}, 'modifier_token': {'<new1>': [D]}}``:
                        FULL weights despite the name.
``"compvis"``           original repo, CompVis flavour: ``delta_epoch=*.ckpt`` = ``{'state_dict':
                        {'model.diffusion_model.<ldm block>.attn2.to_k.weight': W', ..., 'embed':
                        [n, D_emb]}}``: FULL weights; ``embed`` rows are the last n rows of the token
                        table, named ``<new1>`` ... ``<newn>`` in row order (the repo's convention:
                        ``--modifier_token "<new1>+<new2>"`` adds them in that order).
``"compressed"``        original repo ``src/compress.py``: ``compressed_delta*.{bin,ckpt}``, either
                        ``{'unet': {'<attn2>.to_k.weight': {'u': U·diag(s) [h,r], 'v': Vᵀ [r,D]}},
                        'modifier_token': ...}`` (``--diffuser``) or ``{'state_dict': {<ldm name>:
                        {'u','v'}, 'embed': [n, D]}}``. DELTAS: W' = W0 + u @ v.
``"kv"``                impasto's own compressed file (safetensors; ``write_kv``): per layer
                        ``<attn2>.to_k.u`` fp16 [h,r], ``<attn2>.to_k.v`` fp16 [r,D], same for
                        ``to_v``; ``token.<placeholder>`` fp32 [D_emb]; header metadata
                        ``impasto.family="kv"``, ``impasto.format_version="1"``, ``impasto.rank``,
                        ``impasto.energy``.
======================  ========================================================================

CompVis names -> diffusers names: computed from the diffusers names themselves (``compvis_name_map``),
with the LDM numbering that diffusers' own converter uses: ``input_blocks.0`` is conv_in, each down
level has ``layers_per_block`` [ResBlock, SpatialTransformer] blocks and (except the last) one
downsample block, so ``down_blocks.i.attentions.j`` = ``input_blocks.{1 + i·(lpb+1) + j}.1``;
``mid_block.attentions.j`` = ``middle_block.{1 + 2j}``; ``up_blocks.i.attentions.j`` =
``output_blocks.{i·(lpb+1) + j}.1``. ``lpb`` (layers_per_block, uniform) is read off the names: the
number of attentions of a down block (an up block has lpb+1). The block index ``i`` is the real one,
so blocks without attention (SDXL's first, SD 1.5's last down block) need no special case.

Refusals, each naming the file and the key: unknown keys and non-tensor values -> AdapterFormatError;
a layer with k but no v (or u without v), q without out or out without q -> AdapterFormatError; q/out
weights outside the diffusers layout (the original repo's ``crossattn`` checkpoints), or read without
the base's Q/out (``qout_base``), a saved text encoder, SDXL two-encoder tokens -> AdapterUnsupportedError; a module the
base has no attn2 for, or a shape that does not fit the base -> AdapterShapeError naming the module;
NaN/Inf -> AdapterValueError (``read_kv`` only). ``.bin``/``.ckpt`` are only ever read with
``torch.load(..., weights_only=True)``, also by ``read_kv_header``: a pickle that would run code is
refused with AdapterFormatError and nothing in it is executed.

API:
    base_kv_weights(unet) -> {attn2 name: (W_k [h,D], W_v [h,D])}
    base_qout_weights(unet) -> {attn2 name: (W_q [h,h_in], W_out [h_out,h], b_out [h_out] or None)}
    is_kv_layout(path) -> bool                         # named as a Custom Diffusion tool names its output
    read_kv_header(path, base, qout_base=None) -> KvFileHeader   # safetensors: header only, no tensor data
    read_kv(path, base, qout_base=None) -> KvFile                # full-weight layouts become deltas W' - W0
    energy_rank(s, energy=0.6) -> int                  # the paper's rank rule on singular values
    compress_kv_delta(kvfile, *, rank=None, energy=0.6) -> (KvFile, {name: (r_k, r_v)})
    write_kv(path, kvfile) -> int                      # bytes written
    merge_kv(kvfiles, captions, *, categories, tokenizer, text_encoder, base) -> KvFile
    compvis_name_map(names) -> {ldm attn2 prefix: diffusers attn2 name}
``base`` is the dict ``base_kv_weights(unet)`` returns; for headers only its shapes are used (meta
tensors are fine).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from safetensors.torch import save_file

from ..errors import AdapterFormatError, AdapterShapeError, AdapterUnsupportedError, AdapterValueError
from .files import MAX_EMBEDDING_VECTORS, MAX_TOKENS, PICKLE_SUFFIXES, WeightsFile, checked

__all__ = [
    "FORMATS",
    "QOutLayer",
    "base_qout_weights",
    "FORMAT_VERSION",
    "KvFile",
    "KvFileHeader",
    "KvLayer",
    "KvLayerInfo",
    "base_kv_weights",
    "compress_kv_delta",
    "compvis_name_map",
    "energy_rank",
    "is_kv_layout",
    "kv_file_nbytes",
    "merge_kv",
    "read_kv",
    "read_kv_header",
    "write_kv",
]

FORMATS = ("diffusers", "delta-bin", "compvis", "compressed", "kv")
FORMAT_VERSION = "1"
FAMILY = "kv"

DIFFUSERS_WEIGHT_NAMES = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
_LDM_PREFIX = "model.diffusion_model."
_PROJ = ("to_k", "to_v")

_DIFFUSERS_KEY = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_k|to_v)_custom_diffusion\.weight$")
_DIFFUSERS_UNSUPPORTED = re.compile(r"\.processor\.(to_q_custom_diffusion|to_out_custom_diffusion)\.")
# diffusers' CustomDiffusionAttnProcessor(train_q_out=True) state: to_q_custom_diffusion (no bias) and
# to_out_custom_diffusion = ModuleList([Linear, Dropout]), so its Linear is ".0"
_DIFFUSERS_QOUT_KEY = re.compile(
    r"^(?P<attn>.+)\.processor\.(?P<role>to_q_custom_diffusion\.weight|to_out_custom_diffusion\.0\.weight"
    r"|to_out_custom_diffusion\.0\.bias)$")
_QOUT_ROLES = {"to_q_custom_diffusion.weight": "q", "to_out_custom_diffusion.0.weight": "out",
               "to_out_custom_diffusion.0.bias": "out_bias"}
_FULL_KEY = re.compile(r"^(?P<attn>.+\.attn2)\.(?P<proj>to_k|to_v)\.weight$")
_KV_KEY = re.compile(r"^(?P<attn>.+\.attn2)\.(?P<proj>to_k|to_v)\.(?P<role>u|v)$")
_QOUT_KEY = re.compile(r"\.attn2\.(to_q\.weight|to_out\.0\.(weight|bias))$")

# ---------------------------------------------------------------------------------------------
# Normalized form.
# ---------------------------------------------------------------------------------------------


@dataclass
class KvLayer:
    """One attn2 module's change of W_k and W_v: dense (dk, dv) or factored (u @ v)."""

    dk: torch.Tensor | None = None  # Shape: [h, D]
    dv: torch.Tensor | None = None  # Shape: [h, D]
    k_factors: tuple[torch.Tensor, torch.Tensor] | None = None  # (u [h, r], v [r, D]): delta_k = u @ v
    v_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self):
        if (self.dk is None) == (self.k_factors is None) or (self.dv is None) == (self.v_factors is None):
            raise ValueError("KvLayer needs exactly one of dk / k_factors and one of dv / v_factors")

    @property
    def factored(self) -> bool:
        return self.k_factors is not None and self.v_factors is not None

    @property
    def rank_k(self) -> int | None:
        return None if self.k_factors is None else int(self.k_factors[0].shape[1])

    @property
    def rank_v(self) -> int | None:
        return None if self.v_factors is None else int(self.v_factors[0].shape[1])

    def delta_k(self) -> torch.Tensor:
        """Dense delta of W_k, Shape: [h, D]."""
        return self.dk if self.dk is not None else self.k_factors[0] @ self.k_factors[1]

    def delta_v(self) -> torch.Tensor:
        """Dense delta of W_v, Shape: [h, D]."""
        return self.dv if self.dv is not None else self.v_factors[0] @ self.v_factors[1]


@dataclass
class QOutLayer:
    """One attn2 module's change of W_q and of its output projection (to_out.0), dense."""

    dq: torch.Tensor  # Shape: [h, h_in]
    dout: torch.Tensor  # Shape: [h_out, h]
    dbias: torch.Tensor | None  # Shape: [h_out]; None when the file has no output bias


@dataclass
class KvFile:
    """A fully read, validated Custom Diffusion adapter."""

    path: str
    format: str  # one of FORMATS, or "merged" for merge_kv's result
    layers: dict[str, KvLayer]  # key: diffusers attn2 module name
    tokens: dict[str, torch.Tensor]  # placeholder -> embedding row, Shape: [D_emb], float32
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata ({} for pickles)
    notes: list[str] = field(default_factory=list)
    qout: dict[str, QOutLayer] = field(default_factory=dict)  # freeze_model="crossattn" files only


@dataclass(frozen=True)
class KvLayerInfo:
    """One attn2 module as the header describes it; no weight data."""

    out_features: int  # h
    in_features: int  # D
    rank_k: int | None  # None: the file stores a full weight (or dense delta), not factors
    rank_v: int | None
    keys: tuple[str, ...]  # the file's keys of this layer (nested pickle keys joined by "/")
    dtype: torch.dtype  # stored dtype


@dataclass
class KvFileHeader:
    """What ``read_kv_header`` learns without reading tensor data (safetensors) ."""

    path: str  # the weights file actually read (inside the folder, when a folder was given)
    format: str  # one of FORMATS
    layers: dict[str, KvLayerInfo]
    placeholders: list[str]  # modifier tokens, in file order
    token_dim: int | None  # D_emb (None without tokens)
    metadata: dict[str, str]
    nbytes: int  # bytes of the layer tensors as stored (tokens not counted)
    token_paths: dict[str, str] = field(default_factory=dict)  # placeholder -> file it came from
    notes: list[str] = field(default_factory=list)
    qout: dict[str, dict[str, str]] = field(default_factory=dict)  # attn2 -> {"q"|"out"|"out_bias": key}

    @property
    def rank(self) -> int | None:
        """Largest rank over layers for factored layouts; None for full-weight layouts."""
        ranks = [r for i in self.layers.values() for r in (i.rank_k, i.rank_v) if r is not None]
        return max(ranks) if ranks else None


def base_kv_weights(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{attn2 module name: (W_k [h, D], W_v [h, D])} of a diffusers UNet, in module order (no copies)."""
    out = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and hasattr(module, "to_k") and hasattr(module, "to_v"):
            out[name] = (module.to_k.weight.detach(), module.to_v.weight.detach())
    return out


def base_qout_weights(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """{attn2 module name: (W_q [h, h_in], W_out [h_out, h], b_out [h_out] or None)}, in module order
    (no copies): what a ``freeze_model="crossattn"`` file's Q/out weights are read against."""
    out = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn2") and hasattr(module, "to_q") and hasattr(module, "to_out"):
            lin = module.to_out[0]
            out[name] = (module.to_q.weight.detach(), lin.weight.detach(),
                         None if lin.bias is None else lin.bias.detach())
    return out


# ---------------------------------------------------------------------------------------------
# CompVis (LDM) names.
# ---------------------------------------------------------------------------------------------

_DIFF_ATTN2 = re.compile(
    r"^(?:(?P<kind>down_blocks|up_blocks)\.(?P<i>\d+)|mid_block)\.attentions\.(?P<j>\d+)"
    r"\.transformer_blocks\.(?P<t>\d+)\.attn2$"
)


def compvis_name_map(names: Iterable[str]) -> dict[str, str]:
    """{``input_blocks.4.1.transformer_blocks.0.attn2``: ``down_blocks.1.attentions.0.transformer_blocks.0.attn2``, ...}.

    ``names``: the diffusers attn2 module names of the base (``base_kv_weights(unet)`` keys). The
    LDM numbering (see the module docstring) needs ``layers_per_block``; it is read off the names
    (attentions per down block; an up block has one more), assumed uniform as in every SD layout.
    """
    parsed = []
    for name in names:
        m = _DIFF_ATTN2.match(name)
        if m:
            parsed.append((name, m["kind"] or "mid", int(m["i"] or 0), int(m["j"]), int(m["t"])))
    down = [j for _, kind, _, j, _ in parsed if kind == "down_blocks"]
    up = [j for _, kind, _, j, _ in parsed if kind == "up_blocks"]
    lpb = max(down) + 1 if down else (max(up) if up else 1)
    out = {}
    for name, kind, i, j, t in parsed:
        if kind == "down_blocks":
            block = f"input_blocks.{1 + i * (lpb + 1) + j}.1"
        elif kind == "up_blocks":
            block = f"output_blocks.{i * (lpb + 1) + j}.1"
        else:
            block = f"middle_block.{1 + 2 * j}"
        out[f"{block}.transformer_blocks.{t}.attn2"] = name
    return out


# ---------------------------------------------------------------------------------------------
# Detection and key parsing.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Parsed:
    format: str
    src: WeightsFile
    # module -> {"to_k": (key,) for a full weight | (u_key, v_key) for factors, "to_v": ...}
    entries: dict[str, dict[str, tuple[str, ...]]]
    full: bool  # entries hold full fine-tuned weights (subtract the base)
    tokens: dict[str, tuple[WeightsFile, str, int | None]]  # placeholder -> (source, key, row of a 2-D key)
    notes: list[str]
    qout: dict[str, dict[str, str]] = field(default_factory=dict)  # attn2 -> {"q"|"out"|"out_bias": key}


def _resolve(path) -> tuple[str, list[str]]:
    """(weights file, token files) for a file or a folder as its tool wrote it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        for w in DIFFUSERS_WEIGHT_NAMES:
            if w in names:
                return _with_token_files(os.path.join(path, w))
        found = _original_files(path)
        if len(found) == 1:
            return found[0], []
        raise AdapterFormatError(
            f"{path}: folder holds {'several' if found else 'no'} Custom Diffusion weights files "
            f"({[os.path.basename(f) for f in found] or 'expected ' + ' or '.join(DIFFUSERS_WEIGHT_NAMES) + ', delta.bin, delta_epoch=*.ckpt, compressed_delta*'}); pass the file"
        )
    checked(path)  # a regular file (a FIFO or device is refused by name, never opened to block)
    if os.path.basename(path) in DIFFUSERS_WEIGHT_NAMES:
        return _with_token_files(path)
    return path, []


def is_kv_layout(path) -> bool:
    """Whether `path` is named as the Custom Diffusion tools name their output (names only; the
    reader judges the content): a folder `read_kv` would take (``pytorch_custom_diffusion_weights*``,
    or one original-repo weights file in it or its ``checkpoints/``), or such a file itself."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return any(n.startswith("pytorch_custom_diffusion_weights") for n in os.listdir(path)) or (
            len(_original_files(path)) == 1
        )
    name = os.path.basename(path)
    return name in DIFFUSERS_WEIGHT_NAMES or _is_original_name(name)


def _original_files(folder: str) -> list[str]:
    """The original repo's weights files (``delta*``, ``compressed_delta*``) in `folder` and its ``checkpoints/``."""
    found = []
    for sub in (folder, os.path.join(folder, "checkpoints")):
        if os.path.isdir(sub):
            found += [os.path.join(sub, n) for n in sorted(os.listdir(sub))
                      if os.path.isfile(os.path.join(sub, n)) and _is_original_name(n)]
    return found


def _is_original_name(name: str) -> bool:
    return (name.startswith(("delta", "compressed_delta")) and name.endswith(PICKLE_SUFFIXES)) or (
        name.startswith("compressed_delta") and name.endswith(".safetensors")
    )


def _with_token_files(weights: str) -> tuple[str, list[str]]:
    folder = os.path.dirname(weights) or "."
    tokens = [
        os.path.join(folder, n) for n in sorted(os.listdir(folder))
        if n not in DIFFUSERS_WEIGHT_NAMES and n.endswith((".safetensors", ".bin"))
        and os.path.isfile(os.path.join(folder, n))
    ]
    return weights, tokens


def _parse(path) -> _Parsed:
    weights, token_files = _resolve(path)
    src = WeightsFile(weights, nested=True)
    keys = src.keys()
    if src.others:
        k, v = next(iter(src.others.items()))
        if isinstance(v, (list, tuple)) and k.startswith("modifier_token/"):
            raise AdapterUnsupportedError(
                f"{weights}: token {k!r} holds a list of {len(v)} embeddings (SDXL, two text encoders); "
                "only single-text-encoder (SD 1.x/2.x) Custom Diffusion is supported"
            )
        raise AdapterFormatError(f"{weights}: unknown entry {k!r} of type {type(v).__name__} (not a tensor)")
    if src.metadata.get("impasto.family") == FAMILY:
        return _parse_kv(weights, src)
    if src.is_safetensors and any(_DIFFUSERS_KEY.match(k) or _DIFFUSERS_UNSUPPORTED.search(k) for k in keys) or (
        not src.is_safetensors and any(k.endswith("_custom_diffusion.weight") for k in keys)
    ):
        return _parse_diffusers(weights, src, token_files)
    if src.is_safetensors:
        if not keys:
            raise AdapterFormatError(f"{weights}: the file holds no tensors")
        raise AdapterFormatError(
            f"{weights}: not a Custom Diffusion file: unknown key {keys[0]!r} (expected "
            "'<attn2>.processor.to_k_custom_diffusion.weight' or an impasto kv file)"
        )
    tops = sorted({k.split("/", 1)[0] for k in keys + src.empty})
    if "unet" in tops:
        return _parse_nested(weights, src, "unet")
    if "state_dict" in tops:
        return _parse_nested(weights, src, "state_dict")
    raise AdapterFormatError(
        f"{weights}: not a Custom Diffusion file: top-level keys {tops[:5]} (expected 'unet' or 'state_dict')"
    )


def _parse_diffusers(weights: str, src: WeightsFile, token_files: list[str]) -> _Parsed:
    entries: dict[str, dict[str, tuple[str, ...]]] = {}
    qout: dict[str, dict[str, str]] = {}
    for k in src.keys():
        q = _DIFFUSERS_QOUT_KEY.match(k)
        if q:  # --freeze_model crossattn: full fine-tuned W_q, W_out, b_out of this attn2
            qout.setdefault(q["attn"], {})[_QOUT_ROLES[q["role"]]] = k
            continue
        m = _DIFFUSERS_KEY.match(k)
        if not m:
            raise AdapterFormatError(f"{weights}: unknown key {k!r} in a diffusers Custom Diffusion file")
        entries.setdefault(m["attn"], {})[m["proj"]] = (k,)
    for k in src.empty:  # save_attn_procs(.bin) writes "<attn1>.processor": {} for weightless processors
        if not k.endswith(".processor"):
            raise AdapterFormatError(f"{weights}: unknown empty entry {k!r}")
    tokens: dict[str, tuple[WeightsFile, str, int | None]] = {}
    for tf in token_files:
        tsrc = WeightsFile(tf, nested=True)
        if tsrc.others or len(tsrc.keys()) != 1:
            raise AdapterFormatError(
                f"{tf}: a token file beside {os.path.basename(weights)} must hold exactly one tensor "
                f"{{'<placeholder>': [D_emb]}}, has keys {tsrc.keys()[:4]}"
            )
        key = tsrc.keys()[0]
        if key in tokens:
            raise AdapterFormatError(f"{tf}: token {key!r} is also defined by {tokens[key][0].path}")
        tokens[key] = (tsrc, key, None)
    for name, roles in qout.items():
        have = next(iter(roles.values()))
        if "q" not in roles or "out" not in roles:  # diffusers' processor loads all of them (strict)
            raise AdapterFormatError(
                f"{weights}: {have!r}: module {name!r} has {'no to_q' if 'q' not in roles else 'no to_out'}"
                "_custom_diffusion weight beside it (train_q_out=True saves to_q and to_out.0 together)")
        if name not in entries:
            raise AdapterFormatError(f"{weights}: {have!r}: module {name!r} has query/output weights but no to_k/to_v")
    return _Parsed("diffusers", src, entries, True, tokens, [], qout)


def _parse_nested(weights: str, src: WeightsFile, top: str) -> _Parsed:
    compvis = top == "state_dict"
    allowed = {top} if compvis else {top, "modifier_token"}
    entries: dict[str, dict[str, tuple[str, ...]]] = {}
    tokens: dict[str, tuple[WeightsFile, str, int | None]] = {}
    factored = None
    for k in src.keys() + src.empty:
        head, _, rest = k.partition("/")
        if head == "text_encoder":
            raise AdapterUnsupportedError(f"{weights}: key {k!r}: a fine-tuned text encoder is not supported")
        if head not in allowed:
            raise AdapterFormatError(f"{weights}: unknown top-level key {head!r} (in {k!r})")
        if k in src.empty:
            if k == "modifier_token":
                continue
            raise AdapterFormatError(f"{weights}: unknown empty entry {k!r}")
        if head == "modifier_token":
            tokens[rest] = (src, k, None)
            continue
        if compvis and rest == "embed":
            continue
        name, _, role = rest.partition("/")
        if _QOUT_KEY.search(name):
            raise AdapterUnsupportedError(
                f"{weights}: key {k!r}: query/output weights (--freeze_model crossattn) are read from diffusers' "
                "layout only (pytorch_custom_diffusion_weights.safetensors, as train_custom_diffusion.py and "
                "impasto.train write it); the original repo's crossattn checkpoints are not supported"
            )
        m = _FULL_KEY.match(name)
        if not m or role not in ("", "u", "v"):
            raise AdapterFormatError(f"{weights}: unknown key {k!r}: not an attn2 to_k/to_v weight or its u/v")
        this_factored = role != ""
        if factored is not None and factored != this_factored:
            raise AdapterFormatError(f"{weights}: key {k!r} mixes full weights and compressed u/v entries")
        factored = this_factored
        slot = entries.setdefault(m["attn"], {})
        if this_factored:
            pair = dict(zip(("u", "v"), slot.get(m["proj"], (None, None))))
            pair[role] = k
            slot[m["proj"]] = (pair["u"], pair["v"])
        else:
            slot[m["proj"]] = (k,)
    if compvis:
        embed_key = f"{top}/embed"
        if embed_key in src.keys():
            shape = src.shape(embed_key)
            if len(shape) == 1:
                tokens["<new1>"] = (src, embed_key, None)
            elif len(shape) == 2:
                _check_token_count(weights, shape[0], shape[0])
                for row in range(shape[0]):
                    tokens[f"<new{row + 1}>"] = (src, embed_key, row)
            else:
                raise AdapterShapeError(f"{weights}: {embed_key!r} has shape {shape}; expected [n_tokens, D_emb]")
        # LDM names -> diffusers names happen in _check_base (they need the base's names).
    for name, slot in entries.items():
        for proj, keys in slot.items():
            if None in keys:
                have = next(x for x in keys if x is not None)
                raise AdapterFormatError(f"{weights}: {have!r} has no {'v' if keys[1] is None else 'u'} beside it")
    fmt = "compressed" if factored else ("compvis" if compvis else "delta-bin")
    return _Parsed(fmt, src, entries, not factored, tokens, [])


def _parse_kv(weights: str, src: WeightsFile) -> _Parsed:
    version = src.metadata.get("impasto.format_version")
    if version != FORMAT_VERSION:
        raise AdapterFormatError(f"{weights}: impasto kv format_version {version!r}; this reader knows {FORMAT_VERSION!r}")
    entries: dict[str, dict[str, tuple[str, ...]]] = {}
    tokens: dict[str, tuple[WeightsFile, str, int | None]] = {}
    for k in src.keys():
        if k.startswith("token."):
            tokens[k[len("token."):]] = (src, k, None)
            continue
        m = _KV_KEY.match(k)
        if not m:
            raise AdapterFormatError(f"{weights}: unknown key {k!r} in an impasto kv file")
        slot = entries.setdefault(m["attn"], {})
        pair = dict(zip(("u", "v"), slot.get(m["proj"], (None, None))))
        pair[m["role"]] = k
        slot[m["proj"]] = (pair["u"], pair["v"])
    for slot in entries.values():
        for keys in slot.values():
            if None in keys:
                have = next(x for x in keys if x is not None)
                raise AdapterFormatError(f"{weights}: {have!r} has no {'.v' if keys[1] is None else '.u'} beside it")
    return _Parsed("kv", src, entries, False, tokens, [])


# ---------------------------------------------------------------------------------------------
# Validation against the base and the header.
# ---------------------------------------------------------------------------------------------


def _check_token_count(path: str, tokens: int, vectors: int) -> None:
    """AdapterShapeError past MAX_TOKENS placeholders or MAX_EMBEDDING_VECTORS vectors per adapter
    (checked on the header's shapes, before a row is read)."""
    if tokens > MAX_TOKENS or vectors > MAX_EMBEDDING_VECTORS:
        raise AdapterShapeError(f"{path}: defines {tokens} placeholder tokens ({vectors} embedding vectors); at most "
                                f"{MAX_TOKENS} tokens and {MAX_EMBEDDING_VECTORS} vectors per adapter")


def _map_names(parsed: _Parsed, base: Mapping) -> None:
    """Rename LDM-named entries (CompVis ckpt, compressed CompVis) to diffusers names, in place."""
    ldm = [n for n in parsed.entries if n.startswith(_LDM_PREFIX)]
    if not ldm:
        return
    mapping = compvis_name_map(base.keys())
    renamed = {}
    for name, slot in parsed.entries.items():
        short = name[len(_LDM_PREFIX):] if name.startswith(_LDM_PREFIX) else None
        if short is None or short not in mapping:
            key = next(iter(slot.values()))[0]
            raise AdapterShapeError(
                f"{parsed.src.path}: adapter made for another base model: no attn2 module for {name!r} (key {key!r})"
            )
        renamed[mapping[short]] = slot
    parsed.entries = renamed


def _check_qout(parsed: _Parsed, qout_base: Mapping | None) -> int:
    """Validate a crossattn file's Q/out keys against the base's to_q / to_out.0; their bytes."""
    if not parsed.qout:
        return 0
    p, src = parsed.src.path, parsed.src
    first = next(iter(parsed.qout.values()))["q"]  # every entry has one (_parse_diffusers)
    if qout_base is None:
        raise AdapterUnsupportedError(
            f"{p}: key {first!r}: query/output weights (--freeze_model crossattn) need the base's to_q and "
            "to_out.0 (read_kv(..., qout_base=base_qout_weights(unet)))")
    nbytes = 0
    for name, roles in parsed.qout.items():
        if name not in qout_base:
            raise AdapterShapeError(f"{p}: adapter made for another base model: no attn2 module {name!r} "
                                    f"(key {roles['q']!r})")
        wq, wout, _ = qout_base[name]
        want = {"q": tuple(wq.shape), "out": tuple(wout.shape), "out_bias": (int(wout.shape[0]),)}
        for role, key in roles.items():
            if not src.dtype(key).is_floating_point:
                raise AdapterValueError(f"{p}: {key!r} has dtype {src.dtype(key)}; weights must be floating point")
            if tuple(src.shape(key)) != want[role]:
                raise AdapterShapeError(f"{p}: module {name!r}: {key!r} has shape {list(src.shape(key))}, the base "
                                        f"{'to_q' if role == 'q' else 'to_out.0'} {'bias' if role == 'out_bias' else 'weight'} "
                                        f"is {list(want[role])}")
            nbytes += src.nbytes(key)
    return nbytes


def _header(path, base: Mapping, qout_base: Mapping | None = None) -> tuple[KvFileHeader, _Parsed]:
    parsed = _parse(path)
    _map_names(parsed, base)
    p, src = parsed.src.path, parsed.src
    if not parsed.entries:
        raise AdapterFormatError(f"{p}: the file holds no attn2 to_k/to_v weights")
    layers: dict[str, KvLayerInfo] = {}
    nbytes = 0
    dims = set()
    for name in sorted(parsed.entries, key=lambda n: list(base).index(n) if n in base else -1):
        slot = parsed.entries[name]
        first = next(iter(slot.values()))[0]
        if name not in base:
            raise AdapterShapeError(f"{p}: adapter made for another base model: no attn2 module {name!r} (key {first!r})")
        for proj in _PROJ:
            if proj not in slot:
                raise AdapterFormatError(f"{p}: module {name!r} has {first!r} but no {proj} weight")
        wk, wv = base[name]
        ranks = {}
        for proj, w0 in zip(_PROJ, (wk, wv)):
            h, d = int(w0.shape[0]), int(w0.shape[1])
            keys = slot[proj]
            for key in keys:
                if not src.dtype(key).is_floating_point:
                    raise AdapterValueError(f"{p}: {key!r} has dtype {src.dtype(key)}; weights must be floating point")
                nbytes += src.nbytes(key)
            if len(keys) == 1:
                got = src.shape(keys[0])
                if got != (h, d):
                    raise AdapterShapeError(f"{p}: module {name!r}: {keys[0]!r} has shape {list(got)}, the base {proj} is {[h, d]}")
                ranks[proj] = None
            else:
                us, vs = src.shape(keys[0]), src.shape(keys[1])
                if len(us) != 2 or len(vs) != 2 or us[0] != h or vs[1] != d or us[1] != vs[0]:
                    raise AdapterShapeError(
                        f"{p}: module {name!r}: {keys[0]!r} {list(us)} @ {keys[1]!r} {list(vs)} does not make the "
                        f"base {proj} shape {[h, d]}"
                    )
                if us[1] > min(h, d):
                    raise AdapterShapeError(
                        f"{p}: module {name!r}: {keys[0]!r} has rank {us[1]}, above min(h, D) = {min(h, d)} of the base {proj}"
                    )
                ranks[proj] = int(us[1])
            dims.add(d)
        layers[name] = KvLayerInfo(
            out_features=int(wk.shape[0]), in_features=int(wk.shape[1]), rank_k=ranks["to_k"], rank_v=ranks["to_v"],
            keys=slot["to_k"] + slot["to_v"], dtype=src.dtype(slot["to_k"][0]),
        )
    token_dim = None
    _check_token_count(p, len(parsed.tokens), len(parsed.tokens))
    for placeholder, (tsrc, key, row) in parsed.tokens.items():
        shape = tsrc.shape(key)
        width = shape[-1] if shape else None
        if not placeholder or (row is None and len(shape) != 1) or width not in dims:
            raise AdapterShapeError(
                f"{tsrc.path}: token {placeholder!r} ({key!r}) has shape {list(shape)}; expected [D_emb] with "
                f"D_emb = the base's cross-attention width {sorted(dims)}"
            )
        if not tsrc.dtype(key).is_floating_point:
            raise AdapterValueError(f"{tsrc.path}: token {key!r} has dtype {tsrc.dtype(key)}")
        token_dim = int(width)
    nbytes += _check_qout(parsed, qout_base)
    header = KvFileHeader(
        path=p, format=parsed.format, layers=layers, placeholders=list(parsed.tokens), token_dim=token_dim,
        metadata=src.metadata, nbytes=nbytes, token_paths={t: s.path for t, (s, _, _) in parsed.tokens.items()},
        notes=parsed.notes, qout=parsed.qout,
    )
    return header, parsed


# ---------------------------------------------------------------------------------------------
# Public readers.
# ---------------------------------------------------------------------------------------------


def read_kv_header(path, base: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   qout_base: Mapping | None = None) -> KvFileHeader:
    """Detect the layout and describe every layer (shapes, ranks) and token without reading tensor data.

    Args:
      path: a weights file, or the folder its tool wrote (diffusers output folder; a folder or its
        ``checkpoints/`` holding exactly one ``delta*``/``compressed_delta*`` file).
      base: ``base_kv_weights(unet)``; only shapes are used here.
      qout_base: ``base_qout_weights(unet)``, needed for a ``freeze_model="crossattn"`` file (its
        to_q / to_out keys are checked against it; without it such a file is AdapterUnsupportedError).
    For safetensors only the header is read; ``.bin``/``.ckpt`` have no header and are loaded whole,
    always with ``torch.load(weights_only=True)``.
    Raises: AdapterFormatError, AdapterUnsupportedError, AdapterShapeError (module docstring).
    """
    return _header(path, base, qout_base)[0]


def _finite(t: torch.Tensor, path: str, key: str) -> torch.Tensor:
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise AdapterValueError(f"{path}: {key!r} contains {'NaN' if bool(torch.isnan(t).any()) else 'Inf'}")
    return t


def read_kv(path, base: Mapping[str, tuple[torch.Tensor, torch.Tensor]], qout_base: Mapping | None = None) -> KvFile:
    """Read and validate a Custom Diffusion file into deltas relative to ``base``.

    Semantics:
      full-weight layouts (diffusers, delta-bin, compvis): dk = W_k' - W_k, dv = W_v' - W_v (float32, dense)
      compressed / kv: k_factors = (u [h, r], v [r, D]) float32, as stored (delta_k = u @ v)
      tokens[placeholder]: float32 [D_emb]
      qout[name] (crossattn files): dq = W_q' - W_q, dout = W_out' - W_out, dbias = b_out' - b_out
        (b_out = 0 for a base without an output bias; dbias None when the file has none), float32
    Raises what read_kv_header raises, plus AdapterValueError for NaN/Inf.
    """
    header, parsed = _header(path, base, qout_base)
    src, p = parsed.src, header.path
    keys = [k for info in header.layers.values() for k in info.keys]
    raw = src.tensors(keys)
    layers = {}
    for name, info in header.layers.items():
        slot = parsed.entries[name]
        parts = {}
        for proj, w0 in zip(_PROJ, base[name]):
            ks = slot[proj]
            if len(ks) == 1:
                parts[proj] = _finite(raw[ks[0]], p, ks[0]) - w0.detach().to(torch.float32)
            else:
                parts[proj] = (_finite(raw[ks[0]], p, ks[0]).contiguous(), _finite(raw[ks[1]], p, ks[1]).contiguous())
        if parsed.full:
            layers[name] = KvLayer(dk=parts["to_k"], dv=parts["to_v"])
        else:
            layers[name] = KvLayer(k_factors=parts["to_k"], v_factors=parts["to_v"])
    tokens = {}
    for placeholder, (tsrc, key, row) in parsed.tokens.items():
        t = tsrc.tensors([key])[key]
        t = t[row] if row is not None else t
        tokens[placeholder] = _finite(t, tsrc.path, key).contiguous()
    qout = {}
    if header.qout:
        raw = src.tensors([k for roles in header.qout.values() for k in roles.values()])
        for name, roles in header.qout.items():
            wq, wout, bout = qout_base[name]
            db = None
            if "out_bias" in roles:
                db = _finite(raw[roles["out_bias"]], p, roles["out_bias"])
                db = db - (0.0 if bout is None else bout.detach().to(torch.float32))
            qout[name] = QOutLayer(dq=_finite(raw[roles["q"]], p, roles["q"]) - wq.detach().to(torch.float32),
                                   dout=_finite(raw[roles["out"]], p, roles["out"]) - wout.detach().to(torch.float32),
                                   dbias=db)
    return KvFile(path=p, format=header.format, layers=layers, tokens=tokens, metadata=header.metadata,
                  notes=header.notes, qout=qout)


def _kv_only(kvfile: KvFile, what: str) -> None:
    """AdapterUnsupportedError for a crossattn file where only K/V have a closed form / a slot."""
    kvfile = getattr(kvfile, "kv", kvfile)  # the kv family's serving wrapper (families/kv.py) holds it
    if kvfile.qout:
        raise AdapterUnsupportedError(
            f"{kvfile.path}: {what}: the adapter also changes to_q / to_out.0 (freeze_model='crossattn'); "
            "impasto's kv file and the closed-form merge hold K and V only")


# ---------------------------------------------------------------------------------------------
# Compression (original repo src/compress.py) and impasto's kv file.
# ---------------------------------------------------------------------------------------------


def energy_rank(s: torch.Tensor, energy: float = 0.6) -> int:
    """The paper's rank rule on singular values ``s`` (descending), as src/compress.py loops it.

    Semantics:
      explain = 0
      for i, t in enumerate(s):
          explain += t / s.sum()
          if explain > energy: break        # strict: a share equal to ``energy`` does not stop
      keep s[:i]                            # the break index itself is excluded
    Quirks kept on purpose: if s[0] alone exceeds ``energy`` the rank is 0 (the delta is dropped);
    if the loop never breaks (rounding, or energy >= 1), i is the last index, so len(s) - 1 are kept.
    The sum runs in s's dtype (float64 here), term by term, like the original.
    """
    s = s.detach().to(torch.float64).flatten()
    total = s.sum()
    if not bool(total > 0):
        return 0
    explain = torch.zeros((), dtype=torch.float64)
    i = -1
    for i, t in enumerate(s):
        explain = explain + t / total
        if explain > energy:
            break
    return max(i, 0)


def _factor(delta: torch.Tensor, rank: int | None, energy: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    r = energy_rank(s, energy) if rank is None else min(int(rank), s.numel())
    return (u[:, :r] * s[:r]).to(torch.float32).contiguous(), vh[:r].to(torch.float32).contiguous(), r


def compress_kv_delta(kvfile: KvFile, *, rank: int | None = None, energy: float = 0.6) -> tuple[KvFile, dict[str, tuple[int, int]]]:
    """SVD-compress every layer's deltas: u = U[:, :r]·diag(s[:r]) [h, r], v = Vᵀ[:r] [r, D].

    ``rank=None``: r per matrix from ``energy_rank(s, energy)`` (the paper's rule); else the fixed
    ``rank`` (clamped to min(h, D)). The error ‖Δ - u v‖_F² is the SVD tail Σ_{j≥r} s_j².
    SVD runs in float64 on the dense delta; factors come back float32 (``write_kv`` stores fp16).
    Returns the compressed KvFile (format "kv", tokens copied) and {name: (r_k, r_v)}.
    """
    _kv_only(kvfile, "compress_kv")
    if rank is None and not (0.0 < energy < 1.0):
        raise ValueError(f"energy must be in (0, 1), got {energy}")
    if rank is not None and rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    layers, ranks = {}, {}
    for name, layer in kvfile.layers.items():
        uk, vk, rk = _factor(layer.delta_k(), rank, energy)
        uv, vv, rv = _factor(layer.delta_v(), rank, energy)
        layers[name] = KvLayer(k_factors=(uk, vk), v_factors=(uv, vv))
        ranks[name] = (rk, rv)
    max_rank = max((r for pair in ranks.values() for r in pair), default=0)
    notes = list(kvfile.notes)
    dropped = [f"{n}.{p}" for n, pair in ranks.items() for p, r in zip(_PROJ, pair) if r == 0]
    if dropped:  # the paper's rule, kept exactly: s_0 alone above `energy` keeps nothing
        notes.append(
            f"energy rule (energy={energy}) kept rank 0 for {len(dropped)} of {2 * len(ranks)} matrices "
            f"(their first singular value alone holds more than {energy} of the sum), e.g. {dropped[0]!r}: "
            "those deltas are dropped; pass rank= to keep them"
        )
    metadata = {
        "impasto.family": FAMILY,
        "impasto.format_version": FORMAT_VERSION,
        "impasto.rank": str(rank if rank is not None else max_rank),
        "impasto.energy": "" if rank is not None else repr(float(energy)),
    }
    out = KvFile(path="", format="kv", layers=layers, tokens={k: v.clone() for k, v in kvfile.tokens.items()},
                 metadata=metadata, notes=notes)
    return out, ranks


def kv_file_nbytes(layer_shapes: Iterable[tuple[int, int]], rank: int, dtype: torch.dtype = torch.float16) -> int:
    """Tensor bytes of a rank-``rank`` kv file over layers of shape (h, D): 2·r·(h + D)·itemsize each.

    SD 1.5 (16 layers, Σh = 12,480, D = 768): 2·r·(12,480 + 16·768)·2 = 99,072·r bytes at fp16.
    """
    return sum(2 * rank * (h + d) * dtype.itemsize for h, d in layer_shapes)


def write_kv(path, kvfile: KvFile) -> int:
    """Write impasto's ``kv`` file (safetensors) from a factored KvFile; return the file's size in bytes.

    Keys: ``<attn2>.to_k.u`` fp16 [h, r], ``<attn2>.to_k.v`` fp16 [r, D], the same for ``to_v``,
    ``token.<placeholder>`` fp32 [D_emb]. Metadata: ``impasto.family="kv"``,
    ``impasto.format_version``, ``impasto.rank``, ``impasto.energy`` (from ``kvfile.metadata`` when
    compress_kv_delta made it). Dense layers are refused: compress first.
    """
    _kv_only(kvfile, "write_kv")
    tensors = {}
    for name, layer in kvfile.layers.items():
        if not layer.factored:
            raise ValueError(f"write_kv: layer {name!r} is dense; compress it with compress_kv_delta first")
        for proj, (u, v) in (("to_k", layer.k_factors), ("to_v", layer.v_factors)):
            tensors[f"{name}.{proj}.u"] = u.detach().to(torch.float16).contiguous()
            tensors[f"{name}.{proj}.v"] = v.detach().to(torch.float16).contiguous()
            for key in (f"{name}.{proj}.u", f"{name}.{proj}.v"):
                if not bool(torch.isfinite(tensors[key]).all()):
                    raise AdapterValueError(f"write_kv: {key!r} is not finite in fp16 (overflow?)")
    for placeholder, t in kvfile.tokens.items():
        tensors[f"token.{placeholder}"] = t.detach().to(torch.float32).reshape(-1).contiguous()
    ranks = [r for l in kvfile.layers.values() for r in (l.rank_k, l.rank_v)]
    metadata = {
        "impasto.family": FAMILY,
        "impasto.format_version": FORMAT_VERSION,
        "impasto.rank": kvfile.metadata.get("impasto.rank", str(max(ranks, default=0))),
        "impasto.energy": kvfile.metadata.get("impasto.energy", ""),
    }
    path = os.fspath(path)
    save_file(tensors, path, metadata=metadata)
    return os.path.getsize(path)


# ---------------------------------------------------------------------------------------------
# Closed-form multi-concept merge (original repo src/diffusers_composenW.py).
# ---------------------------------------------------------------------------------------------


def _features(texts: list[str], tokenizer, text_encoder, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenated last hidden states of ``texts``, unpadded, with the original's row drop:
    texts with 'photo of a' in their first 15 characters lose their first 4 rows (BOS + 3 words),
    all others lose BOS. EOS is kept.

    Placeholders are tokenized as added tokens are (the text is split at them and each piece
    BPE-encoded alone) and get ids past the embedding table; a hook on the token embedding puts
    their vectors there. The caller's tokenizer and text encoder are not modified.
    """
    emb = text_encoder.get_input_embeddings()
    n = emb.num_embeddings
    fake = {t: n + i for i, t in enumerate(tokens)}
    vectors = {n + i: v for i, v in enumerate(tokens.values())}
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)) + ")") if tokens else None
    state = {}

    def pre(module, args):
        state["ids"] = args[0]
        return (args[0].clamp(max=n - 1),)

    def post(module, args, out):
        out = out.clone()
        for i, v in vectors.items():
            out[state["ids"] == i] = v.to(out.dtype)
        return out

    handles = [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
    rows = []
    try:
        with torch.no_grad():
            for text in texts:
                ids = [tokenizer.bos_token_id]
                for piece in split.split(text) if split else [text]:
                    if piece in fake:
                        ids.append(fake[piece])
                    elif piece.strip():
                        ids += tokenizer(piece, add_special_tokens=False).input_ids
                ids = ids[: tokenizer.model_max_length - 1] + [tokenizer.eos_token_id]
                hidden = text_encoder(torch.tensor([ids]))[0][0].to(torch.float64)
                rows.append(hidden[4:] if "photo of a" in text[:15] else hidden[1:])
    finally:
        for h in handles:
            h.remove()
    return torch.cat(rows, 0)


def _check_conditioned(m: torch.Tensor, what: str, hint: str) -> None:
    """Refuse a (numerically) singular system: LU would solve it silently into garbage."""
    cond = float(torch.linalg.cond(m))
    if not math.isfinite(cond) or cond > 1e12:
        raise AdapterValueError(f"merge_kv: {what} is singular (condition number {cond:.3g}); {hint}")


def merge_kv(
    kvfiles: list[KvFile],
    captions: list[str],
    *,
    categories: list[str],
    tokenizer,
    text_encoder,
    base: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    token_names: list[str] | None = None,
) -> KvFile:
    """Merge single-concept Custom Diffusion adapters in closed form (paper §3.2, diffusers_composenW.py).

    Semantics, per matrix W ∈ {W_k, W_v} of every base attn2 layer (float64):
      C_reg [M, D]  = features of ``captions`` (the original: first 200 lines of regularization_captions.txt)
      for concept k: s = "<new_k> category_k" (or "category_k" if it has no token);
                     targets = [s, "painting in the style of " + s if "art" in s else "photo of a " + s]
      C [T, D]      = features of all targets, exact duplicate rows removed (first kept)
      Vᵀ [h, T]     = W'_k C_kᵀ, each concept's own fine-tuned W' = W0 + Δ_k on its own targets
      solve  min_W ‖(W - W0) C_regᵀ‖_F  s.t.  W Cᵀ = Vᵀ:
      d = C (C_regᵀ C_reg)⁻¹ [T, D] (torch.linalg.solve, LU);  Ŵ = W0 + (Vᵀ - W0 Cᵀ)(d Cᵀ)⁻¹ d
    Features: the text encoder's last hidden state, unpadded, BOS dropped (first 4 rows for a text
    with 'photo of a' in its first 15 characters, as the original). C_regᵀC_reg must be invertible:
    M ≥ D rows.
    Tokens: each input must have at most one token; they are renamed ``<new1>``, ``<new2>``, ... in
    input order (the original's rule: every diffusers-trained concept is ``<new1>``), or to
    ``token_names`` when given.
    Returns a KvFile (format "merged") with dense deltas Ŵ - W0 for every base layer.
    """
    if len(categories) != len(kvfiles):
        raise ValueError(f"merge_kv: {len(kvfiles)} adapters but {len(categories)} categories")
    if len(kvfiles) < 1:
        raise ValueError("merge_kv: nothing to merge")
    for kf in kvfiles:
        _kv_only(kf, "merge_kv")
    names = token_names or [f"<new{i + 1}>" for i in range(len(kvfiles))]
    tokens: dict[str, torch.Tensor] = {}
    strings = []
    for kf, cat, new in zip(kvfiles, categories, names):
        if len(kf.tokens) > 1:
            raise AdapterValueError(f"merge_kv: {kf.path or 'adapter'} has {len(kf.tokens)} tokens; merge single-concept adapters")
        if kf.tokens:
            tokens[new] = next(iter(kf.tokens.values())).to(torch.float32)
            strings.append(f"{new} {cat}")
        else:
            strings.append(cat)
    c_reg = _features(list(captions), tokenizer, text_encoder, {})
    per_concept = []
    for s in strings:
        second = f"painting in the style of {s}" if "art" in s else f"photo of a {s}"
        per_concept.append(_features([s, second], tokenizer, text_encoder, tokens))
    targets = torch.cat(per_concept, 0)
    owner = torch.cat([torch.full((c.shape[0],), k) for k, c in enumerate(per_concept)])
    keep = [i for i in range(targets.shape[0]) if not any(bool((targets[i] - targets[j]).abs().mean() == 0) for j in range(i))]
    targets, owner = targets[keep], owner[keep]

    gram = c_reg.T @ c_reg  # [D, D]
    _check_conditioned(gram, f"C_regᵀC_reg of {len(captions)} captions ({c_reg.shape[0]} token rows)", "add captions")
    d = torch.linalg.solve(gram, targets.T).T  # C (C_regᵀ C_reg)⁻¹, gram symmetric   [T, D]
    e2 = d @ targets.T  # [T, T]
    _check_conditioned(e2, f"d Cᵀ of {targets.shape[0]} target rows", "the targets are (nearly) linearly dependent")
    layers = {}
    for name, (wk0, wv0) in base.items():
        deltas = []
        for proj, w0 in (("k", wk0), ("v", wv0)):
            w0 = w0.detach().to(torch.float64)
            values = torch.empty(w0.shape[0], targets.shape[0], dtype=torch.float64)  # Vᵀ [h, T]
            for k, kf in enumerate(kvfiles):
                cols = owner == k
                layer = kf.layers.get(name)
                w = w0 if layer is None else w0 + (layer.delta_k() if proj == "k" else layer.delta_v()).to(torch.float64)
                values[:, cols] = w @ targets[cols].T
            e1 = values - w0 @ targets.T  # [h, T]
            delta = torch.linalg.solve(e2.T, e1.T).T  # e1 e2⁻¹
            deltas.append((delta @ d).to(torch.float32))
        layers[name] = KvLayer(dk=deltas[0], dv=deltas[1])
    return KvFile(
        path="", format="merged", layers=layers, tokens=tokens,
        metadata={"impasto.merge.categories": "+".join(categories), "impasto.merge.sources": "+".join(k.path for k in kvfiles)},
    )
