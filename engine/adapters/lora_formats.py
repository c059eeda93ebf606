"""LoRA file readers: every on-disk layout users have, read into one normalized form.

The engine applies LoRA per row with a kernel. From a file it needs, per UNet module, the
down matrix A, the up matrix B and the scale that diffusers + PEFT apply when the same file
is loaded with ``pipe.load_lora_weights`` (or PEFT's own loader, for PEFT folders).

Semantics:
    for every entry ``layers[name] = LoraLayer(down, up, scale)``:
        delta_W[name] = scale * up @ down          # Shape: [out, in]
        y = base(x) + scale * (x @ down.T) @ up.T  # what PEFT's LoRA Linear computes
    down  Shape: [r, in]   PEFT's ``lora_A.weight`` layout (a 1x1 conv [r, in, 1, 1] is squeezed)
    up    Shape: [out, r]  PEFT's ``lora_B.weight`` layout (a 1x1 conv [out, r, 1, 1] is squeezed)
    scale float            lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

Layouts (``LoraFile.format``), each as its own tool writes it:

=====================  ==========================================================================
``"diffusers-old"``    ``[unet.]<module>.lora.down.weight`` / ``.lora.up.weight`` (what
                       ``convert_state_dict_to_diffusers`` writes for attention projections),
                       ``.lora_linear_layer.down/up.weight``, and the attention-processor layout
                       ``<attn>.processor.to_{q,k,v,out}_lora.down/up.weight``. Files written
                       by ``convert_state_dict_to_diffusers`` mix these keys with ``lora_A/B`` keys
                       (feed-forward, proj_in/proj_out): every key is read.
``"diffusers"``        ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (``save_lora_weights``);
                       alpha in the ``lora_adapter_metadata`` header entry (JSON, ``unet.``-prefixed
                       LoraConfig fields), when the writer passed ``unet_lora_adapter_metadata``.
``"diffusers-adapter"`` the same keys without the ``unet.`` prefix (``unet.save_lora_adapter``);
                       header metadata holds the unprefixed LoraConfig fields.
``"peft"``             ``base_model.model.<module>.lora_A.weight`` in ``adapter_model.safetensors``
                       (or ``.bin``) with ``adapter_config.json`` beside it: ``r``, ``lora_alpha``,
                       ``rank_pattern``, ``alpha_pattern``, ``use_rslora``. A folder or the file.
``"kohya"``            ``lora_unet_<module with . -> _>.lora_down.weight`` / ``.lora_up.weight``
                       / ``.alpha`` (scalar). Names are resolved against the base UNet's module
                       names, since ``_`` is ambiguous once dots are replaced.
=====================  ==========================================================================

Scale, per layout (verified against diffusers 0.42.1 + peft 0.21.2 in tests/test_lora_formats.py):

* With a LoraConfig (``lora_adapter_metadata`` header, or ``adapter_config.json``): PEFT's own
  rule. ``r`` and ``lora_alpha`` are overridden per module by the first ``rank_pattern`` /
  ``alpha_pattern`` key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)`` (peft's
  ``get_pattern_key``); scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``. The config's
  rank must equal the tensors' rank (PEFT would fail to load otherwise).
* No alpha information (``save_lora_weights`` without metadata drops it): alpha = r, scale 1.0,
  as diffusers loads such files.
* kohya: scale = alpha / r per module, from the module's own ``.alpha`` tensor; no ``.alpha`` or
  alpha 0 means alpha = r (kohya's rule). diffusers agrees whenever all alphas are equal, and for
  non-attention modules. With unequal alphas diffusers gives every *attention* projection the most
  common alpha (its alpha_pattern keys keep ``processor.to_q_lora.down.weight`` and match no
  module); impasto keeps the per-module alpha kohya trained with, as kohya, A1111 and ComfyUI do.
* ``.alpha`` tensors inside diffusers layouts (``unet.<module>.alpha``): diffusers 0.42.1 ignores
  them and loads the file at scale 1.0; impasto does the same and records a line in
  ``LoraFile.notes``.

Refusals, each naming the file and the key: text-encoder keys (``lora_te_``, ``lora_te1_``,
``lora_te2_``, ``text_encoder.``, ``text_encoder_2.``, ``te_``...) are not refused here: they come
back untouched in ``text_encoder_layers`` for the engine to decide. LoCon (kxk conv LoRA), LoHa,
LoKr and DoRA layers come back in ``variants`` (lora_variants.py: their keys, math and per-row
path); LyCORIS DoRA (``dora_scale``), LoCon Tucker, LoRA with bias and other PEFT variants raise
AdapterUnsupportedError naming the kind; unknown keys, truncated or corrupt files, missing files and PEFT files without their
config raise AdapterFormatError; a module the base UNet does not have raises AdapterShapeError;
a down/up rank mismatch raises AdapterShapeError; NaN/Inf or non-float weights raise
AdapterValueError (checked by ``read_lora``, not by ``read_lora_header``). Files are opened
through ``files.py``: a ``.bin`` holding a pickle is only read with
``torch.load(..., weights_only=True)`` (a pickle that would run code is refused), one holding
safetensors bytes is read as safetensors.

API:
    read_lora_header(path, unet_module_names) -> LoraFileHeader   # no weight data read*
    read_lora(path, unet_module_names, *, dtype=torch.float32) -> LoraFile
``path`` is a ``.safetensors``/``.bin`` file or a folder (PEFT folder with
``adapter_config.json``, or a diffusers folder holding ``pytorch_lora_weights.safetensors``).
``unet_module_names`` is any iterable of the base UNet's module names
(``dict(unet.named_modules())``). Shapes are not checked against the base modules here; the
engine does that.
(*) For safetensors only the header is read, plus the scalar kohya ``.alpha`` tensors, which
the scales need. A ``.bin`` has no header: it is loaded whole.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from ..errors import AdapterFormatError, AdapterShapeError, AdapterUnsupportedError, AdapterValueError
from . import lora_variants
from .files import ALPHA_BOUND, WeightsFile, checked, opened

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "LoraFile",
    "LoraFileHeader",
    "LoraLayer",
    "LoraLayerInfo",
    "read_lora",
    "read_lora_header",
]

FORMATS = ("diffusers-old", "diffusers", "diffusers-adapter", "peft", "kohya")

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base
PEFT_CONFIG_NAME = "adapter_config.json"
_PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_DIFFUSERS_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")

_TEXT_ENCODER_PREFIXES = (
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "text_encoder.",
    "text_encoder_2.",
    "text_encoder_3.",
    "te_",
    "te1_",
    "te2_",
    "te.",
    "te1.",
    "te2.",
)

# Substrings that mark an adapter kind impasto refuses by name (checked before anything else).
_UNSUPPORTED_MARKERS = (
    ("dora_scale", "LyCORIS DoRA (dora_scale)"),
    ("lora_mid", "LoCon with Tucker decomposition (lora_mid)"),
    ("oft_blocks", "OFT"),
    ("oft_diag", "OFT"),
    ("ia3_", "IA3"),
    ("lora_B.bias", "LoRA with bias (lora_bias=True)"),
    ("lora_up.bias", "LoRA with bias (lora_bias=True)"),
    (".w_norm", "LyCORIS norm-layer fine-tune"),
    (".b_norm", "LyCORIS norm-layer fine-tune"),
)

# LoraConfig fields that turn PEFT's LoRA into a different computation (peft 0.21.2 lora variants).
_UNSUPPORTED_CONFIG_FIELDS = (
    ("lora_bias", "LoRA with bias (lora_bias=True)"),
    ("velora_config", "VeLoRA"),
    ("alora_invocation_tokens", "aLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("use_bdlora", "BD-LoRA"),
    ("arrow_config", "Arrow"),
    ("kasa_config", "KaSA"),
    ("layer_replication", "layer replication"),
)

# diffusers/PEFT key suffixes -> role. Longest first: ".lora.down.weight" must not be seen as ".down.weight".
_SUFFIX_ROLES = (
    (".lora_linear_layer.down.weight", "down", True),
    (".lora_linear_layer.up.weight", "up", True),
    (".lora.down.weight", "down", True),
    (".lora.up.weight", "up", True),
    (".lora_A.weight", "down", False),
    (".lora_B.weight", "up", False),
    (".lora_magnitude_vector.weight", "magnitude", False),  # PEFT DoRA as diffusers keeps it
    (".lora_magnitude_vector", "magnitude", False),  # PEFT DoRA (get_peft_model_state_dict)
) + tuple((suffix, suffix[1:], False) for suffix in lora_variants.ROLE_SUFFIXES)  # PEFT LoHa / LoKr
# Old attention-processor layout: "<attn>.processor.to_q_lora.down.weight" -> module "<attn>.to_q".
_PROCESSOR_KEY = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")
_PROCESSOR_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_KOHYA_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")) + tuple(
    (suffix, suffix[1:]) for suffix in lora_variants.ROLE_SUFFIXES)  # LyCORIS LoHa / LoKr, kohya names
_SGM_BLOCK_NAMES = ("input_blocks_", "middle_block_", "output_blocks_", "label_emb_", "time_embed_")


@dataclass
class LoraLayer:
    """One UNet module's LoRA. delta_W = scale * up @ down, Shape: [out, in]."""

    down: torch.Tensor  # A, Shape: [r, in] (PEFT lora_A.weight layout)
    up: torch.Tensor  # B, Shape: [out, r] (PEFT lora_B.weight layout)
    scale: float  # what PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraLayerInfo:
    """One UNet module's LoRA as the header describes it; no weight data."""

    rank: int
    in_features: int
    out_features: int
    scale: float
    down_key: str  # the file's key of A
    up_key: str  # the file's key of B
    conv1x1: bool  # stored as a [r, in, 1, 1] / [out, r, 1, 1] conv pair
    dtype: torch.dtype  # stored dtype of A (B is checked to match at full read)


@dataclass
class LoraFileHeader:
    """What ``read_lora_header`` learns without reading weights."""

    path: str  # the weights file actually read (inside the folder, when a folder was given)
    format: str  # one of FORMATS
    layers: dict[str, LoraLayerInfo]  # key: diffusers UNet module name
    text_encoder_keys: list[str]  # raw keys left for the engine
    metadata: dict[str, str]  # the safetensors header metadata ({} for .bin)
    nbytes: int  # bytes of the UNet layers' A and B tensors as stored
    notes: list[str] = field(default_factory=list)  # what was read differently from the obvious
    variants: dict = field(default_factory=dict)  # module -> lora_variants.VariantLayerInfo (LoCon, LoHa, LoKr, DoRA)


@dataclass
class LoraFile:
    """A fully read, validated LoRA file."""

    path: str
    format: str  # one of FORMATS
    layers: dict[str, LoraLayer]  # key: diffusers UNet module name, e.g. "...attn1.to_q"
    text_encoder_layers: dict[str, torch.Tensor]  # raw key -> tensor, untouched, for the engine
    metadata: dict[str, str]  # the safetensors header metadata (str -> str; {} for .bin)
    notes: list[str] = field(default_factory=list)
    variants: dict = field(default_factory=dict)  # module -> lora_variants.VariantLayer, served by their own path


def _resolve_path(path) -> tuple[str, str | None]:
    """Return (weights file, path of the adapter_config.json beside it or None) for a file or folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = set(os.listdir(path))
        if PEFT_CONFIG_NAME in names:
            for name in _PEFT_WEIGHT_NAMES:
                if name in names:
                    return os.path.join(path, name), os.path.join(path, PEFT_CONFIG_NAME)
            raise AdapterFormatError(f"{path}: PEFT folder has {PEFT_CONFIG_NAME} but none of {_PEFT_WEIGHT_NAMES}")
        for name in _DIFFUSERS_WEIGHT_NAMES:
            if name in names:
                return os.path.join(path, name), None
        found = sorted(n for n in names if n.endswith(".safetensors"))
        if len(found) == 1:
            return os.path.join(path, found[0]), None
        raise AdapterFormatError(f"{path}: folder holds no single LoRA weights file (found: {found or 'none'})")
    checked(path)  # a regular file (a FIFO or device is refused by name, never opened to block)
    config_path = os.path.join(os.path.dirname(path) or ".", PEFT_CONFIG_NAME)
    return path, (config_path if os.path.isfile(config_path) else None)


def _read_peft_config(path: str) -> dict:
    try:
        with opened(path) as f:
            config = json.loads(f.read(2**20 + 1)) if os.fstat(f.fileno()).st_size <= 2**20 else None
    except RecursionError:
        raise AdapterFormatError(f"{path}: unreadable PEFT config: JSON nested too deep") from None
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{path}: unreadable PEFT config: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: PEFT config must be a JSON object of at most 1 MiB")
    return config


def check_alpha(path: str, where: str, alpha, rank: int) -> float:
    """`alpha` as a float once it is finite and |alpha| <= ALPHA_BOUND * rank; else AdapterValueError
    naming the file and where the alpha came from (a NaN or 1e39 alpha would serve a NaN image)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError, OverflowError):
        raise AdapterValueError(f"{path}: {where}: alpha {alpha!r:.40} is not a number") from None
    if not math.isfinite(value) or abs(value) > ALPHA_BOUND * rank:
        raise AdapterValueError(f"{path}: {where}: alpha {value} is not finite or above "
                                f"{ALPHA_BOUND:g} * rank {rank} in magnitude")
    return value


# ---------------------------------------------------------------------------------------------
# Key parsing.
# ---------------------------------------------------------------------------------------------


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(_TEXT_ENCODER_PREFIXES)


def _family(key: str) -> str:
    if key.startswith("lora_unet_"):
        return "kohya"
    if key.startswith("base_model.model."):
        return "peft"
    if key.startswith("unet."):
        return "unet"
    return "bare"


def _parse_diffusers_key(key: str) -> tuple[str, str, bool] | None:
    """'<module><suffix>' -> (module, role, old_style); role in down/up/alpha."""
    m = _PROCESSOR_KEY.match(key)
    if m:
        return f"{m['attn']}.{_PROCESSOR_PROJ[m['proj']]}", m["role"], True
    for suffix, role, old in _SUFFIX_ROLES:
        if key.endswith(suffix):
            module = key[: -len(suffix)].replace(".processor.", ".")  # diffusers' KEYS_TO_ALWAYS_REPLACE
            return module, role, old
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha", True
    return None


class _KohyaNames:
    """kohya flattens module paths ('.' -> '_'); map them back through the base UNet's names."""

    def __init__(self, unet_module_names: Iterable[str]):
        self.names: dict[str, str | None] = {}
        for name in unet_module_names:
            flat = name.replace(".", "_")
            self.names[flat] = None if flat in self.names and self.names[flat] != name else name

    def resolve(self, flat: str, path: str, key: str) -> str:
        if flat in self.names:
            name = self.names[flat]
            if name is None:
                raise AdapterFormatError(f"{path}: kohya key {key!r} matches several UNet modules")
            return name
        if flat.startswith(_SGM_BLOCK_NAMES):
            raise AdapterUnsupportedError(
                f"{path}: kohya key {key!r} uses SGM/LDM block names (SDXL-style input_blocks/output_blocks); "
                "only diffusers-named kohya UNet keys are supported"
            )
        raise AdapterShapeError(f"{path}: adapter made for another base model: no module {flat!r} (key {key!r})")


def _refuse_unsupported(path: str, key: str) -> None:
    if key.endswith((".diff", ".diff_b")):
        raise AdapterUnsupportedError(f"{path}: full weight-difference (LyCORIS diff) adapters are not supported (key {key!r})")
    for marker, kind in _UNSUPPORTED_MARKERS:
        if marker in key:
            raise AdapterUnsupportedError(f"{path}: {kind} adapters are not supported (key {key!r})")


@dataclass
class _Parsed:
    format: str
    entries: dict[str, dict[str, str]]  # module -> {"down": key, "up": key, "alpha": key}
    text_encoder_keys: list[str]
    ignored_alpha_keys: list[str]


def _parse_keys(path: str, keys: list[str], unet_module_names: set[str]) -> _Parsed:
    te_keys = [k for k in keys if _is_text_encoder_key(k)]
    for k in te_keys:
        if k.endswith(lora_variants.ROLE_SUFFIXES) or "magnitude" in k:
            kind = "LoHa" if ".hada_" in k else "LoKr" if ".lokr_" in k else "DoRA"
            raise AdapterUnsupportedError(f"{path}: {kind} on the text encoder is not supported (key {k!r})")
    unet_keys = [k for k in keys if not _is_text_encoder_key(k)]
    for k in unet_keys:
        _refuse_unsupported(path, k)
    if not unet_keys and not te_keys:
        raise AdapterFormatError(f"{path}: the file holds no tensors")

    families = {}
    for k in unet_keys:
        families.setdefault(_family(k), k)
    if len(families) > 1:
        shown = ", ".join(f"{fam}: {k!r}" for fam, k in families.items())
        raise AdapterFormatError(f"{path}: keys mix several LoRA layouts ({shown})")
    if families:
        family = next(iter(families))
    else:  # text-encoder-only file: name the layout after its text-encoder keys
        family = "kohya" if te_keys[0].startswith("lora_te") else "unet"

    entries: dict[str, dict[str, str]] = {}
    old_style = False
    kohya = _KohyaNames(unet_module_names) if family == "kohya" else None
    for k in unet_keys:
        if family == "kohya":
            for suffix, role in _KOHYA_SUFFIXES:
                if k.endswith(suffix):
                    flat = k[len("lora_unet_") : -len(suffix)]
                    break
            else:
                raise AdapterFormatError(f"{path}: unknown key {k!r} in a kohya LoRA file")
            module = kohya.resolve(flat, path, k)
        else:
            prefix = {"peft": "base_model.model.", "unet": "unet.", "bare": ""}[family]
            parsed = _parse_diffusers_key(k[len(prefix) :])
            if parsed is None:
                raise AdapterFormatError(f"{path}: unknown key {k!r}: not a LoRA A/B/alpha weight")
            module, role, old = parsed
            old_style |= old and role != "alpha"
        slot = entries.setdefault(module, {})
        if role in slot:
            raise AdapterFormatError(f"{path}: keys {slot[role]!r} and {k!r} both give the {role} of module {module!r}")
        slot[role] = k

    if family == "kohya":
        fmt = "kohya"
    elif family == "peft":
        fmt = "peft"
    elif old_style:
        fmt = "diffusers-old"
    else:
        fmt = "diffusers" if family == "unet" else "diffusers-adapter"

    ignored_alpha = []
    for module, slot in sorted(entries.items()):
        variant = set(slot) - {"down", "up", "alpha", "magnitude"}  # LoHa / LoKr roles: checked by classify
        if not variant and ("down" not in slot or "up" not in slot):
            have = slot.get("down") or slot.get("up") or slot.get("alpha")
            missing = "up (B)" if "down" in slot else "down (A)"
            raise AdapterFormatError(f"{path}: module {module!r} has no {missing} weight (have {have!r})")
        if module not in unet_module_names:
            raise AdapterShapeError(
                f"{path}: adapter made for another base model: no module {module!r} (key {next(iter(slot.values()))!r})"
            )
        if "alpha" in slot and fmt != "kohya":
            ignored_alpha.append(slot.pop("alpha"))
    return _Parsed(fmt, entries, te_keys, ignored_alpha)


# ---------------------------------------------------------------------------------------------
# Scales.
# ---------------------------------------------------------------------------------------------


def _get_pattern_key(pattern_keys: Iterable[str], key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key (peft 0.21.2), copied so peft stays a test-only dependency."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


class _ConfigScale:
    """PEFT's per-module r and scaling from a LoraConfig dict."""

    def __init__(self, config: dict, path: str, where: str, peft_type: str = "LORA"):
        self.path, self.where = path, where
        declared = config.get("peft_type", "LORA")
        if str(declared).upper() != peft_type:
            raise AdapterUnsupportedError(f"{path}: {where} declares peft_type {declared!r}, the file holds {peft_type} "
                                          "keys (impasto reads PEFT's LORA, LOHA and LOKR)")
        for name, kind in _UNSUPPORTED_CONFIG_FIELDS:
            if config.get(name):
                raise AdapterUnsupportedError(f"{path}: {kind} adapters are not supported ({where} field {name!r})")
        if config.get("init_lora_weights") == "mica":
            raise AdapterUnsupportedError(f"{path}: MiCA adapters are not supported ({where} init_lora_weights='mica')")
        try:
            self.r = int(config.get("r", 8))
            self.alpha = float(config.get("lora_alpha" if peft_type == "LORA" else "alpha", 8))
            self.rank_pattern = dict(config.get("rank_pattern") or {})
            self.alpha_pattern = dict(config.get("alpha_pattern") or {})
            self.use_rslora = bool(config.get("use_rslora", False))
        except (TypeError, ValueError) as e:
            raise AdapterFormatError(f"{path}: malformed LoRA config in {where}: {e}") from e

    def scale(self, module: str, rank: int, key: str, *, rank_in_file: bool = True) -> float:
        try:
            r = self.rank_pattern.get(_get_pattern_key(self.rank_pattern.keys(), module), self.r)
            alpha = self.alpha_pattern.get(_get_pattern_key(self.alpha_pattern.keys(), module), self.alpha)
        except (re.error, TypeError) as e:
            raise AdapterFormatError(f"{self.path}: {self.where}: malformed rank_pattern / alpha_pattern: {e}") from None
        if not isinstance(r, int) or isinstance(r, bool):
            raise AdapterFormatError(f"{self.path}: {self.where} gives module {module!r} rank {r!r:.40}, not an integer")
        if not rank_in_file:  # LoKr with both halves full: PEFT still scales by alpha / r
            rank = int(r)
        if int(r) != rank:
            raise AdapterFormatError(
                f"{self.path}: {self.where} gives module {module!r} rank {r}, but {key!r} has rank {rank}"
            )
        alpha = check_alpha(self.path, f"{self.where}, module {module!r}", alpha, rank)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _diffusers_metadata_config(path: str, metadata: dict, fmt: str) -> dict | None:
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except RecursionError:
        raise AdapterFormatError(f"{path}: header entry {LORA_ADAPTER_METADATA_KEY!r} is JSON nested too deep") from None
    except ValueError as e:
        raise AdapterFormatError(f"{path}: header entry {LORA_ADAPTER_METADATA_KEY!r} is not JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: header entry {LORA_ADAPTER_METADATA_KEY!r} is not a JSON object")
    if fmt in ("diffusers", "diffusers-old"):
        # save_lora_weights packs every component's config with its prefix (_pack_dict_with_prefix);
        # load_lora_into_unet keeps the "unet." ones and strips the prefix.
        if any(k.startswith("unet.") for k in config) or any(k.startswith("text_encoder") for k in config):
            config = {k.removeprefix("unet."): v for k, v in config.items() if k.startswith("unet.")}
    return config or None


def _layer_scales(path, parsed: _Parsed, src: WeightsFile, peft_config: dict | None, notes: list[str]) -> dict[str, float]:
    ranks = {m: src.shape(slot["down"])[0] for m, slot in parsed.entries.items()}
    if parsed.format == "kohya":
        alpha_keys = [slot["alpha"] for slot in parsed.entries.values() if "alpha" in slot]
        alphas = {}
        for key, value in src.tensors(alpha_keys).items():
            if value.numel() != 1:
                raise AdapterFormatError(f"{path}: alpha {key!r} must be a scalar, has shape {tuple(value.shape)}")
            alphas[key] = float(value.float().item())
        scales = {}
        for m, slot in parsed.entries.items():
            alpha = alphas.get(slot.get("alpha"), 0.0)
            if "alpha" in slot:
                check_alpha(path, f"alpha {slot['alpha']!r}", alpha, ranks[m])
            scales[m] = (alpha if alpha != 0.0 else ranks[m]) / ranks[m]
        return scales

    if parsed.ignored_alpha_keys:
        notes.append(
            f"{len(parsed.ignored_alpha_keys)} '.alpha' tensor(s) (e.g. {parsed.ignored_alpha_keys[0]!r}) ignored: "
            "diffusers 0.42.1 does not read alphas in diffusers-layout files and loads them at scale 1.0"
        )
        logger.warning("%s: %s", path, notes[-1])

    if parsed.format == "peft":
        if peft_config is None:
            raise AdapterFormatError(
                f"{path}: PEFT adapter weights ({next(iter(src.keys()))!r}) without {PEFT_CONFIG_NAME} beside them: "
                "lora_alpha is unknown"
            )
        rule = _ConfigScale(peft_config, path, PEFT_CONFIG_NAME)
    else:
        config = _diffusers_metadata_config(path, src.metadata, parsed.format)
        if config is None:
            return {m: 1.0 for m in parsed.entries}  # no alpha anywhere: alpha = r, as diffusers loads it
        rule = _ConfigScale(config, path, f"header entry {LORA_ADAPTER_METADATA_KEY!r}")
    return {m: rule.scale(m, ranks[m], parsed.entries[m]["down"]) for m in parsed.entries}


def _variant_scales(path, fmt: str, entries: dict, kinds: dict, src: WeightsFile, peft_config) -> dict[str, float]:
    """LoHa / LoKr scale c per module, as their tools apply it: LyCORIS (kohya names) alpha / r from
    the module's `.alpha` (no alpha or 0: alpha = r; LoKr with both halves full: 1); PEFT
    (LoHaConfig / LoKrConfig) alpha / r from adapter_config.json, rank_pattern / alpha_pattern."""
    shapes = {m: {role: src.shape(k) for role, k in e.items() if role != "alpha"} for m, e in entries.items()}
    ranks = {m: lora_variants.rank_of(kinds[m], shapes[m]) for m in entries}
    if fmt == "kohya":
        alpha_keys = [e["alpha"] for e in entries.values() if "alpha" in e]
        alphas = {k: v for k, v in src.tensors(alpha_keys).items()}
        out = {}
        for m, e in entries.items():
            if ranks[m] == 0:
                out[m] = 1.0
                continue
            alpha = 0.0
            if "alpha" in e:
                value = alphas[e["alpha"]]
                if value.numel() != 1:
                    raise AdapterFormatError(f"{path}: alpha {e['alpha']!r} must be a scalar, has shape {tuple(value.shape)}")
                alpha = check_alpha(path, f"alpha {e['alpha']!r}", float(value.float().item()), ranks[m])
            out[m] = (alpha if alpha != 0.0 else ranks[m]) / ranks[m]
        return out
    if fmt != "peft":
        first = next(iter(entries.values()))
        raise AdapterUnsupportedError(f"{path}: LoHa / LoKr keys in a {fmt} layout (key {next(iter(first.values()))!r}); "
                                      "impasto reads them as LyCORIS (lora_unet_ names) or PEFT write them")
    if peft_config is None:
        raise AdapterFormatError(f"{path}: PEFT adapter weights without {PEFT_CONFIG_NAME} beside them: alpha is unknown")
    out = {}
    for kind in ("loha", "lokr"):
        mods = [m for m in entries if kinds[m] == kind]
        if mods:
            rule = _ConfigScale(peft_config, path, PEFT_CONFIG_NAME, peft_type=kind.upper())
            for m in mods:
                key = next(iter(v for r, v in entries[m].items() if r != "alpha"))
                out[m] = rule.scale(m, ranks[m], key, rank_in_file=ranks[m] > 0)
    return out


# ---------------------------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------------------------


def _layer_info(path, module, slot, src: WeightsFile, scale: float) -> LoraLayerInfo:
    dk, uk = slot["down"], slot["up"]
    ds, us = src.shape(dk), src.shape(uk)
    conv = len(ds) == 4
    if len(ds) not in (2, 4) or len(us) != len(ds):
        raise AdapterFormatError(f"{path}: {dk!r} {ds} and {uk!r} {us} are not a LoRA pair of 2-D or 4-D weights")
    if conv:
        if ds[2:] != (1, 1):
            raise AdapterUnsupportedError(
                f"{path}: {ds[2]}x{ds[3]}-conv LoRA is not supported (key {dk!r}, shape {ds}); only 1x1 conv or linear"
            )
        if us[2:] != (1, 1):
            raise AdapterUnsupportedError(f"{path}: conv LoRA with a {us[2]}x{us[3]} up kernel is not supported ({uk!r})")
    if ds[0] != us[1]:
        raise AdapterShapeError(f"{path}: module {module!r}: down {dk!r} has rank {ds[0]} but up {uk!r} has rank {us[1]}")
    if ds[0] == 0:
        raise AdapterShapeError(f"{path}: module {module!r} has rank 0 ({dk!r})")
    for key in (dk, uk):
        if not src.dtype(key).is_floating_point:
            raise AdapterValueError(f"{path}: {key!r} has dtype {src.dtype(key)}; LoRA weights must be floating point")
    return LoraLayerInfo(
        rank=ds[0], in_features=ds[1], out_features=us[0], scale=scale, down_key=dk, up_key=uk, conv1x1=conv,
        dtype=src.dtype(dk),
    )


def _read_header(path, unet_module_names) -> tuple[LoraFileHeader, WeightsFile]:
    names = set(unet_module_names)
    weights_path, config_path = _resolve_path(path)
    src = WeightsFile(weights_path)
    parsed = _parse_keys(weights_path, src.keys(), names)
    # Only PEFT's loader reads adapter_config.json; diffusers' loaders ignore one beside their files.
    peft_config = _read_peft_config(config_path) if parsed.format == "peft" and config_path else None
    notes: list[str] = []
    shapes = {k: src.shape(k) for k in src.keys()}
    kinds = {m: lora_variants.classify(weights_path, m, slot, shapes) for m, slot in parsed.entries.items()}
    # plain pairs, 3x3-conv LoRA and DoRA take LoRA's scale rule; LoHa / LoKr their own
    lora_like = {m: e for m, e in parsed.entries.items() if kinds[m] in (None, "conv", "dora")}
    scales = {}
    if lora_like:
        scales = _layer_scales(weights_path, _Parsed(parsed.format, lora_like, parsed.text_encoder_keys,
                                                     parsed.ignored_alpha_keys), src, peft_config, notes)
    hadamard = {m: e for m, e in parsed.entries.items() if kinds[m] in ("loha", "lokr")}
    if hadamard:
        scales.update(_variant_scales(weights_path, parsed.format, hadamard, kinds, src, peft_config))
    layers = {
        m: _layer_info(weights_path, m, parsed.entries[m], src, scales[m]) for m in sorted(parsed.entries)
        if kinds[m] is None
    }
    variants = {}
    for m in sorted(parsed.entries):
        if kinds[m] is None:
            continue
        keys = {role: k for role, k in parsed.entries[m].items() if role != "alpha"}
        for key in keys.values():
            if not src.dtype(key).is_floating_point:
                raise AdapterValueError(f"{weights_path}: {key!r} has dtype {src.dtype(key)}; weights must be floating point")
        sh = {role: tuple(shapes[k]) for role, k in keys.items()}
        variants[m] = lora_variants.VariantLayerInfo(
            kind=kinds[m], keys=keys, shapes=sh, rank=lora_variants.rank_of(kinds[m], sh), scale=scales[m],
            nbytes=sum(src.nbytes(k) for k in keys.values()))
    nbytes = sum(src.nbytes(i.down_key) + src.nbytes(i.up_key) for i in layers.values())
    nbytes += sum(v.nbytes for v in variants.values())
    header = LoraFileHeader(
        path=weights_path, format=parsed.format, layers=layers, text_encoder_keys=parsed.text_encoder_keys,
        metadata=src.metadata, nbytes=nbytes, notes=notes, variants=variants,
    )
    return header, src


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------


def read_lora_header(path, unet_module_names: Iterable[str]) -> LoraFileHeader:
    """Detect the layout and describe every UNet layer (rank, in, out, scale) without reading weights.

    Args:
      path: a .safetensors/.bin file, or a PEFT or diffusers folder.
      unet_module_names: the base UNet's module names, e.g. ``dict(unet.named_modules())``.
    Raises: AdapterFormatError, AdapterUnsupportedError, AdapterShapeError (see the module docstring).
    """
    return _read_header(path, unet_module_names)[0]


def read_lora(path, unet_module_names: Iterable[str], *, dtype: torch.dtype = torch.float32) -> LoraFile:
    """Read and validate every UNet layer of a LoRA file; text-encoder tensors come back raw.

    Semantics:
      layers[name].down  Shape: [r, in], dtype ``dtype``
      layers[name].up    Shape: [out, r], dtype ``dtype``
      delta_W[name] = layers[name].scale * up @ down
    Raises what read_lora_header raises, plus AdapterValueError for NaN/Inf (after the cast to
    ``dtype``, so fp32 values that overflow fp16 are caught too).
    """
    header, src = _read_header(path, unet_module_names)
    p = header.path
    keys = [k for info in header.layers.values() for k in (info.down_key, info.up_key)]
    keys += [k for v in header.variants.values() for k in v.keys.values()]
    raw = src.tensors(keys + header.text_encoder_keys)
    layers = {}
    for module, info in header.layers.items():
        pair = []
        for key in (info.down_key, info.up_key):
            t = raw[key]
            if info.conv1x1:
                t = t.reshape(t.shape[0], t.shape[1])
            t = t.to(dtype=dtype).contiguous()
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise AdapterValueError(f"{p}: {key!r} contains {bad} (as {dtype})")
            pair.append(t)
        layers[module] = LoraLayer(down=pair[0], up=pair[1], scale=info.scale)
    variants = {}
    for module, v in header.variants.items():
        tensors = {}
        for role, key in v.keys.items():
            t = raw[key].to(dtype=dtype).contiguous()
            if not bool(torch.isfinite(t).all()):
                bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                raise AdapterValueError(f"{p}: {key!r} contains {bad} (as {dtype})")
            tensors[role] = t
        variants[module] = lora_variants.VariantLayer(kind=v.kind, tensors=tensors, rank=v.rank, scale=v.scale)
    te = {k: raw[k] for k in header.text_encoder_keys}
    return LoraFile(
        path=p, format=header.format, layers=layers, text_encoder_layers=te, metadata=header.metadata, notes=header.notes,
        variants=variants,
    )



# ---------------------------------------------------------------------------------------------
# Text-encoder LoRA (applied once per request and branch by the conditioning plan).
# ---------------------------------------------------------------------------------------------

_TE_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
)


def text_encoder_lora_layers(path, keys_shapes: dict, metadata: dict, te_module_names, alphas=None) -> dict:
    """Resolve a LoRA file's text-encoder keys to the base text encoder's modules.

    Semantics: diffusers keys `text_encoder.<module>.lora_A/B.weight` (also `lora.down/up`,
    `lora_linear_layer`; an old `text_model.` prefix is dropped when the module has none), scale
    from the `text_encoder.`-prefixed LoraConfig in `lora_adapter_metadata` (PEFT's rule) else 1;
    kohya keys `lora_te_<module with . -> _>.lora_down/.lora_up/.alpha`, scale alpha / r.
    Returns {module: (down key, up key, scale)}; AdapterShapeError for a module the text encoder
    lacks, AdapterUnsupportedError for a second text encoder (SDXL).
    """
    names = set(te_module_names)
    under = {n.replace(".", "_"): n for n in names}
    entries: dict[str, dict] = {}
    kohya = False
    for key in keys_shapes:
        if key.startswith(("text_encoder_2.", "lora_te2_")):
            raise AdapterUnsupportedError(f"{path}: key {key!r}: a second text encoder (SDXL) is not supported")
        if key.startswith(("lora_te_", "lora_te1_")):
            kohya = True
            stem, _, rest = key.partition(".")
            base = stem.split("_", 2)[2] if stem.startswith("lora_te1_") else stem[len("lora_te_"):]
            module = under.get(base) or under.get(base.removeprefix("text_model_"))
            kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
        else:
            body = key.removeprefix("text_encoder.")
            module, kind = None, None
            for suffix, k in _TE_SUFFIXES:
                if body.endswith(suffix):
                    module, kind = body[: -len(suffix)], k
                    break
            if module is not None and module not in names and module.removeprefix("text_model.") in names:
                module = module.removeprefix("text_model.")
        if kind is None:
            raise AdapterFormatError(f"{path}: unknown text-encoder LoRA key {key!r}")
        if module not in names:
            raise AdapterShapeError(f"{path}: key {key!r}: the base text encoder has no such module")
        entries.setdefault(module, {})[kind] = key
    config = None
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if raw and not kohya:
        raw_cfg = _diffusers_metadata_config(path, {LORA_ADAPTER_METADATA_KEY: raw}, "diffusers-adapter") or {}
        cfg = {k.removeprefix("text_encoder."): v for k, v in raw_cfg.items() if k.startswith("text_encoder.")}
        config = _ConfigScale(cfg, path, "text_encoder LoraConfig") if cfg else None
    out = {}
    for module, e in entries.items():
        if "down" not in e or "up" not in e:
            raise AdapterFormatError(f"{path}: text-encoder module {module!r} lacks its {'up' if 'down' in e else 'down'} weight")
        rank = keys_shapes[e["down"]][0]
        if keys_shapes[e["up"]][1] != rank:
            raise AdapterShapeError(f"{path}: {e['down']!r} has rank {rank}, {e['up']!r} does not match")
        if kohya:
            alpha = (alphas or {}).get(e.get("alpha"), rank) or rank
            scale = check_alpha(path, f"text-encoder module {module!r}", alpha, rank) / rank
        else:
            scale = config.scale(module, rank, e["down"]) if config else 1.0
        out[module] = (e["down"], e["up"], scale)
    return out
