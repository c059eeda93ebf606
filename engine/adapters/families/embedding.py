"""The `embedding` family: textual-inversion embeddings, injected per row into the text encoder's
input embeddings (the plan's placeholder path), as diffusers' `load_textual_inversion` does.

Files (`read_embedding`), each as its tool writes it:
  * A1111 `.pt`:   {"string_to_token": {"*": id}, "string_to_param": {"*": Tensor[n, D]}, "name": str, ...}
  * A1111 `.safetensors`: {"emb_params": Tensor[n, D]}
  * diffusers `learned_embeds.safetensors` / `.bin`: {"<token>": Tensor[D] or Tensor[n, D]}

Semantics (A1111's, and diffusers' for the same token): once registered as `register(name, path,
token=T)`, the embedding applies wherever T appears as a word of a prompt or negative prompt, with
no `adapters=` entry (naming it there is allowed and changes nothing). A multi-vector embedding
(n > 1) occupies n consecutive positions, as diffusers' `maybe_convert_prompt` expands T into
"T T_1 ... T_{n-1}". T may not be a word of the tokenizer's vocabulary, nor another adapter's
token (refused at registration). The default T is the file's own (diffusers key, A1111 "name").
"""

from __future__ import annotations

import os
import re

import torch

from ...api import AdapterInfo
from ...errors import AdapterFormatError, AdapterNameError, AdapterShapeError, AdapterValueError
from .. import files
from . import FAMILY_KEY, Family

_PICKLE_BYTES = 4 * 2**20  # an embedding pickle is KBs; anything larger is no embedding to sniff
_SAFETENSORS_LAYOUT = "emb_params"


def _word(token: str) -> re.Pattern:
    """`token` as a whole word: where it starts (ends) with a letter, digit or underscore, none may
    precede (follow) it; the rule the plan's tokenizer splits by (plan._as_word)."""
    before = r"(?<!\w)" if re.match(r"\w", token) else ""
    after = r"(?!\w)" if re.search(r"\w$", token) else ""
    return re.compile(before + re.escape(token) + after)


def _layout(keys: list[str], shapes: dict) -> str | None:
    if keys == [_SAFETENSORS_LAYOUT]:
        return "a1111-safetensors"
    if len(keys) == 1 and len(shapes[keys[0]]) in (1, 2) and "." not in keys[0] and "/" not in keys[0]:
        return "diffusers"
    return None


def _pickle_layout(obj) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        return "a1111-pt"
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        return "diffusers"
    return None


def read_embedding(path: str) -> tuple[str, str | None, torch.Tensor]:
    """(layout, the file's own token or None, vectors Shape [n, D]) of an embedding file, through
    the file layer (pickles weights-only). AdapterFormatError naming the file and keys otherwise."""
    if path.endswith(files.PICKLE_SUFFIXES) and not files.looks_like_safetensors(path):
        obj = files.load_weights_only(path)
        layout = _pickle_layout(obj)
        if layout == "a1111-pt":
            params = obj["string_to_param"]
            if len(params) != 1 or not isinstance(next(iter(params.values())), torch.Tensor):
                raise AdapterFormatError(f"{path}: A1111 embedding 'string_to_param' must hold one tensor, has {list(params)}")
            name = obj.get("name")
            return layout, name if isinstance(name, str) and name else None, next(iter(params.values()))
        if layout == "diffusers":
            (token, vec), = obj.items()
            return layout, str(token), vec
        shown = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise AdapterFormatError(f"{path}: not a textual-inversion embedding (keys {shown}; expected "
                                 "'string_to_param', 'emb_params' or one token -> vector)")
    src = files.WeightsFile(path)
    keys = src.keys()
    layout = _layout(keys, {k: src.shape(k) for k in keys})
    if layout is None:
        raise AdapterFormatError(f"{path}: not a textual-inversion embedding (keys {keys[:5]}; expected "
                                 "'emb_params' or one token -> vector)")
    (key,) = keys
    vec = src.tensors([key])[key]
    return layout, (None if layout == "a1111-safetensors" else key), vec


def _vectors(path: str, vec, dim: int, dtype) -> torch.Tensor:
    """vec as float [n, D], checked: floating point, D = the text encoder's width, 1 <= n <= the
    bound, finite."""
    if not isinstance(vec, torch.Tensor) or not vec.dtype.is_floating_point:
        raise AdapterValueError(f"{path}: embedding vectors must be a floating-point tensor")
    vec = vec.reshape(1, -1) if vec.dim() == 1 else vec
    if vec.dim() != 2 or vec.shape[1] != dim:
        raise AdapterShapeError(f"{path}: embedding has shape {list(vec.shape)}; this text encoder's input "
                                f"embeddings have width {dim} (made for another base model?)")
    if not 1 <= vec.shape[0] <= files.MAX_EMBEDDING_VECTORS:
        raise AdapterValueError(f"{path}: embedding has {vec.shape[0]} vectors, at most {files.MAX_EMBEDDING_VECTORS}")
    vec = vec.to(dtype or torch.float32)
    if not bool(torch.isfinite(vec).all()):
        raise AdapterValueError(f"{path}: embedding vectors hold NaN or Inf")
    return vec.contiguous()


class EmbeddingFile:
    """A loaded embedding: its token and vectors, Shape [n, D]."""

    def __init__(self, token: str, vectors: torch.Tensor):
        self.token, self.vectors = token, vectors
        self.layers, self.variants = {}, {}  # no UNet LoRA


class EmbeddingFamily(Family):
    name = "embedding"
    implicit = True  # applies wherever its token appears as a word, named or not

    def detect(self, path, metadata) -> bool:
        if metadata.get(FAMILY_KEY) == self.name:
            return True
        if not os.path.isfile(path):
            return False
        try:
            if path.endswith(".safetensors") or files.looks_like_safetensors(path):
                header = files.read_header(path)
                return _layout(list(header.shapes), header.shapes) is not None and not path.endswith(
                    ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"))
            if path.endswith((".pt", ".bin")) and os.path.getsize(path) <= _PICKLE_BYTES:
                return _pickle_layout(files.load_weights_only(path)) is not None
        except Exception:  # noqa: BLE001 - detection never fails; the family that claims the file reports
            return False
        return False

    def register(self, store, name, path, *, suffix, token) -> AdapterInfo:
        te = store.text_encoder
        if te is None:
            raise AdapterFormatError(f"{path}: an embedding needs the engine's text encoder")
        layout, own, vec = read_embedding(path)
        vec = _vectors(path, vec, te.get_input_embeddings().weight.shape[1], torch.float32)
        token = token or own
        if not token:
            raise AdapterNameError(f"{path}: this {layout} embedding names no token; register it with token=")
        self._check_token(store, name, path, token)
        return AdapterInfo(name=name, path=path, family=self.name, format=layout, rank=int(vec.shape[0]),
                           targets=(), nbytes=vec.numel() * vec.element_size(), token=token, suffix=suffix,
                           token_map=((token, token),))

    def _check_token(self, store, name, path, token) -> None:
        if not isinstance(token, str) or not token.strip() or len(token) > 64 or any(c.isspace() for c in token):
            raise AdapterNameError(f"{path}: token {token!r} must be one word of at most 64 characters")
        tok = getattr(store, "tokenizer", None)
        if tok is not None:
            vocab = tok.get_vocab()
            if token in vocab or token.lower() + "</w>" in vocab or token.lower() in vocab:
                raise AdapterNameError(f"{path}: token {token!r} is a word of the tokenizer's vocabulary; "
                                       "choose a token the tokenizer does not know")
        for other in store.names():
            info = store.info(other)
            if other != name and any(token == p for p, _ in info.token_map):
                raise AdapterNameError(f"{path}: token {token!r} is already adapter {other!r}'s token")

    def load(self, store, info) -> EmbeddingFile:
        _, _, vec = read_embedding(info.path)
        te = store.text_encoder
        return EmbeddingFile(info.token, _vectors(info.path, vec, te.get_input_embeddings().weight.shape[1], store.dtype))

    def tokens(self, info, file) -> dict:
        return {info.token: file.vectors}

    def mentioned(self, info, texts) -> bool:
        """Whether its token appears as a word in any of `texts` (the implicit use)."""
        word = _word(info.token)
        return any(word.search(t or "") for t in texts)
