"""The `style` family (Pair Customization's StyleLoRA): a plain LoRA file that a request names
in `Guidance.styles`, applied only in its own guidance branch, whose text gets the style's
suffix. Read, loaded and served exactly as `lora`."""

from __future__ import annotations

from ...errors import AdapterFormatError, AdapterNameError
from . import FAMILIES, detect_family
from .lora import LoraFamily

SUFFIX_KEY = "impasto.style_suffix"


class StyleFamily(LoraFamily):
    name = "style"
    suffix_key = SUFFIX_KEY

    def detect(self, path, metadata) -> bool:
        return bool(metadata.get(SUFFIX_KEY))

    def register(self, store, name, path, *, suffix, token):
        # registered as family="style", the file itself must still be a LoRA one
        held = detect_family(path)
        if not getattr(FAMILIES.get(held), "lora_like", False):
            raise AdapterFormatError(f"{path}: a style adapter must be a LoRA file, this one holds {held!r}")
        return super().register(store, name, path, suffix=suffix, token=token)

    def check_use(self, adapter, info) -> None:
        raise AdapterNameError(f"adapters: {adapter.name!r} is a style adapter; name it in guidance.styles")
