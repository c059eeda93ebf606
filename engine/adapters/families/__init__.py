"""The adapter-family registry: one module per family, one protocol, one ordered table.

A family is everything impasto knows about one kind of adapter: which files are its
(`Family.detect`), how a file is read and checked against the base (`register`, `load`), the
rules for a request naming it (`check_use`), what it puts in the per-row LoRA tables
(`lora_rows`), and what it adds to the conditioning plan (`tokens`, `key_text`,
`text_encoder_lora`, `kv_edit`, `uncond_options`, `image_kv`). The store, the plan and the engine loop over `FAMILIES`;
none of them names a family.

Adding a family is one module holding a `Family` subclass and one line,
`register_family(MyFamily())`.

Order. `FAMILIES` is in registration order: lora, style, kv, rank1, encoder, embedding, then later ones. The plan
applies the families' K/V edits in that order. `detect_family` asks the newest family first, so
a family registered later claims its files before the built-ins do, and lora, registered
first, takes whatever no other family claims.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

from ...api import ADAPTER_NAME, AdapterInfo
from ...errors import AdapterFormatError, RequestError
from .. import files

FAMILY_KEY = "impasto.family"  # safetensors metadata: names the family outright, before any detect


class Use(NamedTuple):
    """One adapter as one planned branch names it."""

    family: "Family"
    name: str
    scale: float
    options: dict  # the request's family options, e.g. {"beta": 0.5} for rank1
    info: AdapterInfo
    file: object  # what family.load returned


# KvEdit(layer, attn, k, v, key_embeds, embeds) -> (k, v): one family's change of one attn2
# layer's planned K and V. k, v: Shape [U, L, inner]; key_embeds, embeds: Shape [U, L, D] (the
# text the K and V pathways read; the same tensor unless a family changed the key text).
KvEdit = Callable[..., tuple]


class ImageKV(NamedTuple):
    """One branch's image tokens as every attn2 layer reads them (decoupled cross-attention):
    the image branch's scale and {attn2 layer: (K', V')}, each Shape [L_img, inner]."""

    scale: float
    kv: dict


class Family:
    """One adapter family. Subclasses set `name` and override what their family does; the
    defaults are "contributes nothing", so a family only writes the parts it has."""

    name: str = ""
    lora_like: bool = False  # its UNet weights go through the per-row LoRA slot pools
    image_input: bool = False  # its adapters read the request's ip_adapter_image (encoder)
    implicit: bool = False  # used by every request whose text `mentioned` it, named or not (embedding)
    kv_positions: bool = False  # kv_edit also gets positions= (the rows' text positions; rank1)

    # ------------------------------------------------------------------ files
    def detect(self, path: str, metadata: dict) -> bool:
        """Whether the file or folder at `path` holds this family's adapter, judged cheaply from
        names and `metadata` (the safetensors header's, {} for folders, pickles and unreadable
        files). A metadata `impasto.family` value is decided before any family is asked."""
        return False

    def register(self, store, name: str, path: str, *, suffix, token) -> AdapterInfo:
        """Read the header at `path`, validate it against the store's base model and describe it.

        Reads no weight data where the format allows. Raises an AdapterError subclass naming the
        file and what is wrong. The store has checked `name`, the path and the adapter root.
        """
        raise NotImplementedError(f"family {self.name!r} cannot register files")

    def load(self, store, info: AdapterInfo) -> object:
        """The fully read, validated weights of a registered adapter (what plan hooks get as `file`)."""
        raise NotImplementedError(f"family {self.name!r} cannot load files")

    # ------------------------------------------------------------------ requests
    def check_use(self, adapter, info: AdapterInfo) -> None:
        """Raise RequestError / AdapterNameError when a request may not name `adapter` (an
        impasto.Adapter: name, scale, options) as it does. Default: no options."""
        if adapter.options:
            raise RequestError(f"adapters: {adapter.name!r} ({self.name}) takes no options, got {sorted(adapter.options)}")

    def lora_rows(self, name: str, scale: float, file) -> list[tuple[str, float]]:
        """This adapter's entries in the per-row UNet LoRA tables: [(name, scale)] or []."""
        return []

    def mentioned(self, info: AdapterInfo, texts) -> bool:
        """For an `implicit` family: whether a request with these prompt texts uses the adapter."""
        return False

    # ------------------------------------------------------------------ plan
    def tokens(self, info: AdapterInfo, file) -> dict:
        """Learned tokens: {placeholder as prompts write it: input embedding, Shape [D_emb] or [n, D_emb]}."""
        return {}

    def key_text(self, text: str, use: Use) -> str:
        """The text the K pathway of every attn2 layer reads instead of `text` (Perfusion's
        global key lock); unchanged by default."""
        return text

    def text_encoder_lora(self, file):
        """The file's text-encoder LoRA (a `TextEncoderLora`) for the plan's text-encoder
        runtime, applied at the request's scale; None without one."""
        return None

    def kv_edit(self, store, rows: list[list[Use]]) -> KvEdit | None:
        """This family's contribution to every attn2 layer's planned K and V.

        rows: per unique branch of the plan, the uses of this family's adapters (some empty; at
        least one not). Do per-plan work here (it runs once), return a KvEdit that the plan
        calls for every layer in order, or None for no change. A family with `kv_positions`
        is called with positions=(value_mask, key_mask), each Shape [U, L] bool: True at every
        chunk's BOS, tokens and EOS, False at the padding after each EOS (prompts.text_positions).
        """
        return None

    def uncond_options(self, options: dict) -> dict:
        """This adapter's options in the request's unconditional (negative-prompt) branch, where
        a family's conditioning differs there (encoder: the variant's unconditional image
        tokens); unchanged by default."""
        return options

    def image_kv(self, store, rows: list[list[Use]]) -> list | None:
        """This family's image tokens for decoupled cross-attention: per unique branch of the
        plan, None or an ImageKV. rows as for `kv_edit`; None: the family adds no image tokens."""
        return None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add `family` to the registry: asked first by detection, last in the plan's edit order."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family: expected a Family, got {type(family).__name__}")
    if not isinstance(family.name, str) or not ADAPTER_NAME.match(family.name):
        raise ValueError(f"register_family: family name {family.name!r} must match [A-Za-z0-9._-]+")
    if family.name in FAMILIES:
        raise ValueError(f"register_family: a family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> Family:
    """Remove a family (adapters registered with it can no longer be loaded)."""
    try:
        return FAMILIES.pop(name)
    except KeyError:
        raise ValueError(f"unregister_family: no family named {name!r}") from None


def detect_family(path: str) -> str:
    """The family a file or tool-written folder holds: its safetensors `impasto.family` value
    when it has one, else the first family, newest first, whose `detect` claims it."""
    metadata = files.header_metadata(path) if os.path.isfile(path) and path.endswith(".safetensors") else {}
    if metadata.get(FAMILY_KEY):
        return metadata[FAMILY_KEY]
    for family in reversed(FAMILIES.values()):
        if family.detect(path, metadata):
            return family.name
    raise AdapterFormatError(f"{path}: no adapter family claims this file (known: {', '.join(FAMILIES)})")


def get_family(name: str, path: str = "") -> Family:
    """The registered family `name`; AdapterFormatError naming `path` when there is none."""
    family = FAMILIES.get(name)
    if family is None:
        raise AdapterFormatError(f"{path}: unknown adapter family {name!r} (known: {', '.join(FAMILIES)})")
    return family


from .lora import LoraFamily  # noqa: E402  (the built-ins need Family, defined above)
from .style import StyleFamily  # noqa: E402
from .kv import KvFamily  # noqa: E402
from .rank1 import Rank1Family  # noqa: E402
from .encoder import EncoderFamily  # noqa: E402
from .embedding import EmbeddingFamily  # noqa: E402

for _builtin in (LoraFamily(), StyleFamily(), KvFamily(), Rank1Family(), EncoderFamily(), EmbeddingFamily()):
    register_family(_builtin)
