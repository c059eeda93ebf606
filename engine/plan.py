"""The conditioning plan: step-invariant work, done once per distinct (request, branch).

For every branch (uncond, cond, later one per style): tokenize and encode the text exactly as
diffusers' `encode_prompt` does, with the branch's learned tokens and text-encoder LoRA, then
compute every cross-attention (attn2) layer's K and V with the branch's K/V-affecting adapters
folded in (docs/formats.md, "Composition on one projection"):

    K = W_K e + Σ sᵢ·ΔW_lora,i e + Σ_families edit        (LoRA on to_k by its hook, per branch row)

What each family adds (tokens, key text, text-encoder LoRA, K/V edits) is the family's
(adapters/families/); this module loops over the registry in its order. The UNet's attn2 reads
these K/V in every step (engine/attention.py) instead of recomputing them. Branches with the same
text and adapters are planned once and shared.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from . import prompts
from .adapters.families import FAMILIES, Use
from .errors import RequestError


@dataclass(frozen=True)
class Branch:
    """One guidance branch of one request: its text and its adapters ((name, scale, options), ...)."""

    text: str
    adapters: tuple = ()  # ((name, scale, ((option, value), ...)), ...)
    chunks: int = 1  # 77-token chunks the text is encoded to (engine/prompts.py)
    clip_skip: int = 1  # A1111's clip skip: 1 = the last layer
    weighted: bool = False  # A1111 emphasis: (word:1.3), [word], BREAK


@dataclass
class Plan:
    """Planned conditioning of a group of requests.

    `index[i]`: the unique branch that branch i of the group maps to;
    `embeds`: Shape [U, L, D], the text encodings of the U unique branches;
    `kv`: attn2 name -> (K, V), each Shape [U, L, inner];
    `image`: per unique branch, None or its ImageKV (decoupled cross-attention image tokens:
    scale and attn2 name -> (K', V'), each Shape [L_img, inner]); [] when no branch has one;
    `lengths[u]`: the keys of branch u (77 * its chunks); positions beyond are zero padding.
    """

    index: list[int]
    embeds: torch.Tensor
    kv: dict
    image: list = field(default_factory=list)
    lengths: list = None


def build_plan(branches: list[Branch], base, attn2: dict, lora, store, files: dict, device, dtype, te_lora=None,
               grad: bool = False) -> Plan:
    """Encode every distinct branch once and compute each attn2 layer's K/V for it.

    Semantics, per unique branch u with adapter uses A_u (in the branch's order):
      tokens[u]    = ∪ family.tokens(info, file) over A_u       (placeholder -> input embedding)
      embeds[u]    = text_encoder(text_u; tokens[u], text-encoder LoRA of A_u at their scales)
      key_text[u]  = text_u through every family.key_text of A_u; encoded alike when it differs
      K, V         = attn.to_k(key_embeds), attn.to_v(embeds) with the UNet LoRA rows of A_u
                     (store.lora_rows), then every family's kv_edit, in registry order
                     (a family with kv_positions also gets each row's text positions,
                     prompts.text_positions: False on the padding after each EOS)
      image[u]     = the family's image_kv for u (encoder: image tokens' K'/V' per attn2 layer)
    `lora`, `te_lora`: the UNet's and the text encoder's LoraRuntime (te_lora None: no text-encoder LoRA).
    grad: plan with autograd on (training, impasto.train), so gradients reach adapter tensors
    that require them (token rows, K/V deltas); serving plans under inference_mode.
    """
    unique = list(dict.fromkeys(branches))
    index = [unique.index(b) for b in branches]
    uses = [[Use(store.family(n), n, s, dict(o), store.info(n), files[n]) for n, s, o in b.adapters] for b in unique]
    tokens = [{p: e for u in row for p, e in u.family.tokens(u.info, u.file).items()} for row in uses]
    # text-encoder LoRA, per branch row, through the same kernel as the UNet's
    te_files = {u.name: te for row in uses for u in row if (te := u.family.text_encoder_lora(u.file)) is not None}
    te_rows = [[(u.name, u.scale) for u in row if u.name in te_files] for row in uses]
    texts = [b.text for b in unique]
    key_texts = [functools.reduce(lambda text, u: u.family.key_text(text, u), row, b.text) for b, row in zip(unique, uses)]
    specs = [(b.chunks, b.clip_skip, b.weighted) for b in unique]
    encode = functools.partial(prompts.encode_prompts, base.tokenizer, base.text_encoder, tokens=tokens,
                               device=device, te_rows=te_rows, te_lora=te_lora, te_files=te_files, grad=grad)
    embeds, lengths = _stack(encode([(t, *spec) for t, spec in zip(texts, specs)]), dtype)
    key_embeds = embeds
    if key_texts != texts:  # same chunks as the text, so the keys line up with the values
        key_embeds, _ = _stack(encode([(t, *spec) for t, spec in zip(key_texts, specs)]), dtype)
    edits, positions = [], None
    for family in FAMILIES.values():
        rows = [[u for u in row if u.family is family] for row in uses]
        if not any(rows):
            continue
        extra = {}
        if family.kv_positions:  # once per plan, only when a family asks: [U, L] bool, values' and keys'
            if positions is None:
                positions = tuple(
                    _stack_mask(prompts.text_positions(base.tokenizer, [(t, *spec) for t, spec in zip(txts, specs)],
                                                       tokens), embeds.shape[1], embeds.device)
                    for txts in (texts, key_texts))
            extra["positions"] = positions
        if (edit := family.kv_edit(store, rows, **extra)) is not None:
            edits.append(edit)
    lora_rows = [store.lora_rows(b.adapters, files) for b in unique]
    kv = {}
    with lora.activate(lora_rows, files), torch.inference_mode(not grad):
        for name, attn in attn2.items():
            k, v = attn.to_k(key_embeds), attn.to_v(embeds)
            for edit in edits:
                k, v = edit(name, attn, k, v, key_embeds, embeds)
            kv[name] = (k, v)
    image = [None] * len(unique)
    with torch.inference_mode():
        for family in FAMILIES.values():  # image encoder, projection and K'/V': once per plan
            rows = [[u for u in row if u.family is family] for row in uses]
            if any(rows) and (planned := family.image_kv(store, rows)) is not None:
                for u, x in enumerate(planned):
                    if x is not None:
                        if image[u] is not None:
                            raise RequestError("adapters: two families give one branch image tokens")
                        image[u] = x
    return Plan(index, embeds, kv, image if any(x is not None for x in image) else [], lengths)


def _stack_mask(rows: list, length: int, device) -> torch.Tensor:
    """Rows of Shape [L_u] bool -> Shape [U, length] bool, False beyond each row (as `_stack` pads)."""
    out = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
    for u, r in enumerate(rows):
        out[u, : r.shape[0]] = r.to(device)
    return out


def _stack(rows: list, dtype) -> tuple[torch.Tensor, list]:
    """Rows of Shape [L_u, D] -> (Shape [U, max L_u, D] zero-padded, [L_u, ...])."""
    lengths = [r.shape[0] for r in rows]
    out = rows[0].new_zeros(len(rows), max(lengths), rows[0].shape[1], dtype=dtype)
    for u, r in enumerate(rows):
        out[u, : r.shape[0]] = r
    return out, lengths


PLACEHOLDER = r"<[^<>\s]+>"  # how learned-token placeholders look in a prompt: <corgi>, <new1>


def _as_word(p: str) -> str:
    import re

    return (r"(?<!\w)" if re.match(r"\w", p) else "") + re.escape(p) + (r"(?!\w)" if re.search(r"\w$", p) else "")


def tokenize_with_placeholders(tokenizer, text: str, placeholders, widths=None) -> tuple[list[int], list[tuple[int, str]]]:
    """Tokenize `text` as diffusers does once each placeholder is a single added token.

    The tokenizer is never grown: each placeholder occupies one position, holding the id of the
    tokenizer's unk token, and is returned with its position so its embedding can be injected.
    Returns (input_ids padded to model_max_length, [(position, placeholder), ...]).
    """
    import re

    max_len = tokenizer.model_max_length
    if placeholders:
        # a word-like token (a textual-inversion "easyneg") matches only as a whole word
        pattern = "(" + "|".join(_as_word(p) for p in sorted(placeholders, key=len, reverse=True)) + ")"
        pieces = re.split(pattern, text)
    else:
        pieces = [text]
    ids, marks = [], []
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a placeholder: one position per vector of its embedding
            marks.append((len(ids) + 1, piece))  # +1: BOS comes first
            ids += [tokenizer.unk_token_id] * (widths or {}).get(piece, 1)
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    ids = ids[: max_len - 2]  # truncation, as tokenizer(truncation=True) keeps BOS and EOS
    marks = [(pos, p) for pos, p in marks if pos < max_len - 1]
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (max_len - len(ids))
    return ids, marks


def encode_with_tokens(tokenizer, text_encoder, texts: list[str], tokens: list[dict], device,
                       grad: bool = False) -> torch.Tensor:
    """Semantics: out[i] = text_encoder(texts[i]) with each placeholder p of tokens[i] encoded as
    one token whose input embedding is tokens[i][p] (textual-inversion style, per row).

    texts: B strings; tokens: B dicts placeholder -> embedding, Shape [D_emb], or [n, D_emb] for a
    multi-vector embedding, which occupies n consecutive positions (diffusers expands it so).
    Returns Shape [B, L, D]. Other rows and the text encoder's tables are untouched.
    grad: autograd on, so gradients reach token embeddings that require them (training).
    """
    rows, injections = [], []
    for b, (text, tok) in enumerate(zip(texts, tokens)):
        widths = {p: e.shape[0] for p, e in tok.items() if e.dim() == 2}  # multi-vector embeddings
        ids, marks = tokenize_with_placeholders(tokenizer, text, list(tok), widths)
        rows.append(ids)
        injections += [(b, pos, tok[p]) for pos, p in marks]
    input_ids = torch.tensor(rows, device=device)
    emb = text_encoder.get_input_embeddings()

    def inject(module, args, output):
        output = output.clone()
        for b, pos, vec in injections:
            vec = vec.reshape(-1, output.shape[-1])[: output.shape[1] - 1 - pos]  # truncation keeps EOS
            output[b, pos : pos + vec.shape[0]] = vec.to(device=output.device, dtype=output.dtype)
        return output

    handle = emb.register_forward_hook(inject) if injections else None
    try:
        with torch.inference_mode(not grad):
            mask = None
            if getattr(text_encoder.config, "use_attention_mask", False):
                mask = (input_ids != tokenizer.pad_token_id).long()
            return text_encoder(input_ids, attention_mask=mask)[0]
    finally:
        if handle is not None:
            handle.remove()
