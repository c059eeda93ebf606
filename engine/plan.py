"""The conditioning plan: step-invariant work, done once per distinct (request, branch).

For every branch (uncond, cond, later one per style): tokenize and encode the text exactly as
diffusers' `encode_prompt` does, then compute every cross-attention (attn2) layer's K and V with
the branch's K/V-affecting adapters folded in:

    K = W_K e + Σ sᵢ·ΔW_lora,i e          (LoRA on to_k applied by its hook, per branch row)

The UNet's attn2 reads these K/V in every step (engine/attention.py) instead of recomputing them.
Branches with the same text and adapters are planned once and shared.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .adapters.store import LORA_LIKE


@dataclass(frozen=True)
class Branch:
    """One guidance branch of one request: its text and its adapters ((name, scale), ...)."""

    text: str
    adapters: tuple = ()  # ((name, scale, ((option, value), ...)), ...)


@dataclass
class Plan:
    """Planned conditioning of a group of requests.

    `index[i]`: the unique branch that branch i of the group maps to;
    `embeds`: Shape [U, L, D], the text encodings of the U unique branches;
    `kv`: attn2 name -> (K, V), each Shape [U, L, inner].
    """

    index: list[int]
    embeds: torch.Tensor
    kv: dict


def build_plan(branches: list[Branch], base, attn2: dict, lora, store, files: dict, device, dtype, te_lora=None) -> Plan:
    """Encode every distinct branch once and compute each attn2 layer's K/V for it.

    Composition on one projection (docs/formats.md): K = h_rank1(e; W0) + Σ sᵢ·ΔW_lora,i e, where
    the LoRA deltas come from the LoRA hooks on to_k/to_v and h_rank1 is Perfusion's gated
    rank-1 edit of W0 (identity when the branch has no rank1 adapter).
    """
    unique = list(dict.fromkeys(branches))
    index = [unique.index(b) for b in branches]
    tokens, concepts = [], []
    for b in unique:
        tok, con = {}, []
        for name, scale, options in b.adapters:
            info = store.info(name)
            if info.family == "rank1":
                f = files[name]
                tok[info.token] = f.token_embedding
                con.append((f, dict(options), info.token))
            elif info.family == "kv":
                for prompt_ph, file_ph in info.token_map:
                    tok[prompt_ph] = files[name].tokens[file_ph]
        tokens.append(tok)
        concepts.append(con)
    # text-encoder LoRA, per branch row, through the same kernel as the UNet's
    te_rows, te_files = [], {}
    for b in unique:
        row = []
        for name, scale, _ in b.adapters:
            te = getattr(files.get(name), "text_encoder", None)
            if te is not None:
                row.append((name, scale))
                te_files[name] = te
        te_rows.append(row)
    texts = [b.text for b in unique]
    key_texts = None
    if any(opt.get("global_lock") for con in concepts for _, opt, _ in con):
        # Global key-locking: the K pathway sees the prompt with each concept's placeholder
        # replaced by its super-category word (Perfusion §2.1, inference only).
        key_texts = list(texts)
        for i, con in enumerate(concepts):
            for f, opt, placeholder in con:
                if opt.get("global_lock"):
                    key_texts[i] = key_texts[i].replace(placeholder, f.super_word)
    with te_lora.activate(te_rows, te_files) if te_lora is not None else contextlib.nullcontext():
        embeds = encode_with_tokens(base.tokenizer, base.text_encoder, texts, tokens, device).to(dtype)
        key_embeds = embeds
        if key_texts is not None:
            key_embeds = encode_with_tokens(base.tokenizer, base.text_encoder, key_texts, tokens, device).to(dtype)
    kv_users = _kv_users(unique, store)
    bases = _rank1_bases(concepts, store) if any(concepts) else None
    lora_rows = [[(n, s) for n, s, _ in b.adapters if store.info(n).family in LORA_LIKE] for b in unique]
    kv = {}
    with lora.activate(lora_rows, files), torch.inference_mode():
        for name, attn in attn2.items():
            k, v = attn.to_k(key_embeds), attn.to_v(embeds)
            k, v = _kv_deltas(k, v, key_embeds, embeds, name, kv_users, files)
            if bases is not None:
                k = _rank1(k, key_embeds, attn.to_k.weight, name, 0, concepts, bases, store)
                v = _rank1(v, embeds, attn.to_v.weight, name, 1, concepts, bases, store)
            kv[name] = (k, v)
    return Plan(index, embeds, kv)


def _kv_users(unique: list, store) -> dict:
    """kv adapter name -> [(branch row, scale), ...]: who gets each Custom Diffusion delta."""
    users: dict[str, list] = {}
    for r, b in enumerate(unique):
        for name, scale, _ in b.adapters:
            if store.info(name).family == "kv":
                users.setdefault(name, []).append((r, scale))
    return users


def _kv_deltas(k, v, key_embeds, embeds, layer: str, users: dict, files):
    """Custom Diffusion: K += s·ΔW_K e, V += s·ΔW_V e for every branch row naming a kv adapter."""
    for name, rows_scales in users.items():
        layer_delta = files[name].layers.get(layer)
        if layer_delta is None:
            continue
        rows = torch.tensor([r for r, _ in rows_scales], device=k.device)
        s = torch.tensor([w for _, w in rows_scales], device=k.device, dtype=k.dtype)[:, None, None]
        k = k.index_add(0, rows, s * _project(key_embeds[rows], layer_delta.dk, layer_delta.k_factors))
        v = v.index_add(0, rows, s * _project(embeds[rows], layer_delta.dv, layer_delta.v_factors))
    return k, v


def _project(e, dense, factors):
    """e @ ΔWᵀ with ΔW dense [h, D] or factored u [h, r] @ v [r, D] (never materialized)."""
    if dense is not None:
        return e @ dense.t()
    u, v = factors
    return (e @ v.t()) @ u.t()


def _rank1_bases(concepts: list, store) -> list:
    """Per branch row, the C⁻¹-orthonormal basis of its concepts' i* (None without concepts);
    the same for every layer, so computed once per plan."""
    from .adapters.rank1 import perfusion_basis

    C_inv = store.covariance().double()
    return [perfusion_basis(torch.stack([f.i_star for f, _, _ in con]).double(), C_inv) if con else None
            for con in concepts]


def _rank1(out, e, W, layer: str, which: int, concepts: list, bases: list, store):
    """Apply every row's Perfusion concepts to one projection's output (which: 0 = K, 1 = V)."""
    from impasto.kernels import rank1_edit

    from .adapters.rank1 import Concept, row_tensors

    C_inv = store.covariance()
    M = max(len(c) for c in concepts)
    rows = []
    for con, basis in zip(concepts, bases):
        cs = [
            Concept(
                f.i_star,
                f.layers[layer][which],
                float(opt.get("beta", f.beta)),
                float(opt.get("tau", f.tau)),
            )
            for f, opt, _ in con
        ]
        rows.append(row_tensors(W, cs, C_inv, slots=M, basis=basis, dtype=torch.float32))
    P, WU, G, O, beta, tau = (torch.stack(t) for t in zip(*rows))
    return rank1_edit(out, e, P, WU, G, O, beta, tau)


PLACEHOLDER = r"<[^<>\s]+>"  # how learned-token placeholders look in a prompt: <corgi>, <new1>


def tokenize_with_placeholders(tokenizer, text: str, placeholders) -> tuple[list[int], list[tuple[int, str]]]:
    """Tokenize `text` as diffusers does once each placeholder is a single added token.

    The tokenizer is never grown: each placeholder occupies one position, holding the id of the
    tokenizer's unk token, and is returned with its position so its embedding can be injected.
    Returns (input_ids padded to model_max_length, [(position, placeholder), ...]).
    """
    import re

    max_len = tokenizer.model_max_length
    if placeholders:
        pattern = "(" + "|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True)) + ")"
        pieces = re.split(pattern, text)
    else:
        pieces = [text]
    ids, marks = [], []
    for i, piece in enumerate(pieces):
        if i % 2 == 1:  # a placeholder
            marks.append((len(ids) + 1, piece))  # +1: BOS comes first
            ids.append(tokenizer.unk_token_id)
        elif piece:
            ids += tokenizer(piece, add_special_tokens=False).input_ids
    ids = ids[: max_len - 2]  # truncation, as tokenizer(truncation=True) keeps BOS and EOS
    marks = [(pos, p) for pos, p in marks if pos < max_len - 1]
    ids = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (max_len - len(ids))
    return ids, marks


def encode_with_tokens(tokenizer, text_encoder, texts: list[str], tokens: list[dict], device) -> torch.Tensor:
    """Semantics: out[i] = text_encoder(texts[i]) with each placeholder p of tokens[i] encoded as
    one token whose input embedding is tokens[i][p] (textual-inversion style, per row).

    texts: B strings; tokens: B dicts placeholder -> embedding, Shape [D_emb].
    Returns Shape [B, L, D]. Other rows and the text encoder's tables are untouched.
    """
    rows, injections = [], []
    for b, (text, tok) in enumerate(zip(texts, tokens)):
        ids, marks = tokenize_with_placeholders(tokenizer, text, list(tok))
        rows.append(ids)
        injections += [(b, pos, tok[p]) for pos, p in marks]
    input_ids = torch.tensor(rows, device=device)
    emb = text_encoder.get_input_embeddings()

    def inject(module, args, output):
        output = output.clone()
        for b, pos, vec in injections:
            output[b, pos] = vec.to(device=output.device, dtype=output.dtype)
        return output

    handle = emb.register_forward_hook(inject) if injections else None
    try:
        with torch.inference_mode():
            mask = None
            if getattr(text_encoder.config, "use_attention_mask", False):
                mask = (input_ids != tokenizer.pad_token_id).long()
            return text_encoder(input_ids, attention_mask=mask)[0]
    finally:
        if handle is not None:
            handle.remove()
