"""The `kv` family (Custom Diffusion): deltas of every attn2 layer's W_K and W_V plus learned
tokens, folded into the planned K/V once per branch (kv.py reads every layout):

    K = W_K e_key + Σ_a s_a·ΔW_K,a e_key,   V = W_V e + Σ_a s_a·ΔW_V,a e

for the branch's kv adapters a at scales s_a; ΔW dense [h, D] or factored u [h, r] @ v [r, D].

A `freeze_model="crossattn"` file also changes W_Q and the output projection (to_out.0, weight and
bias). Those read the latents, so they act in every step, per row: they go through the per-row
LoRA runtime's variant path, as a dense change of each Linear (lora_variants kind "full"):

    q[r] += s·(x[r] @ ΔW_Qᵀ),   out[r] += s·(o[r] @ ΔW_outᵀ + Δb_out)   for the rows naming the adapter

Why dense, not a LoRA pair in the slot pools (A = I, B = ΔW, or an SVD of ΔW): a fine-tuned
full matrix has full rank (every entry moves under AdamW), so its exact factorisation has
r = min(h, h_in), costing r·(h_in + h) multiply-adds per token against h_in·h dense (2× for a
square layer; A = I costs h_in·(h_in + h)); the pools cap r at max_rank (64 by default, 512 at
most: SD 1.5's attn2 is 320–1280 wide); and a LoRA pair has no bias, so Δb_out would not be exact.
The dense change is exact (W0 x + ΔW x = W′x up to fp rounding) and the cheapest exact form.
K/V stay on the planned once-per-request path above.
"""

from __future__ import annotations

import functools

import torch

from ...api import AdapterInfo
from ...errors import AdapterNameError, AdapterUnsupportedError
from .. import kv as kv_format
from ..lora_variants import VariantLayer
from . import FAMILY_KEY, Family


def kv_base(store) -> dict:
    """attn2 K/V weights of the (frozen) base, walked once per store: every kv read needs them."""
    return store.base_value("kv.base", lambda: kv_format.base_kv_weights(store.unet))


def kv_qout_base(store) -> dict:
    """attn2 to_q / to_out.0 weights of the base, walked once per store (crossattn files)."""
    return store.base_value("kv.qout_base", lambda: kv_format.base_qout_weights(store.unet))


class ServedKv:
    """A crossattn adapter as the plan and the LoRA runtime take it: `kv` (the KvFile: K/V deltas
    for the planned K/V, tokens) and, for the runtime, no slot-pool layers and one "full"
    variant per attn2 to_q / to_out.0 (the module docstring)."""

    def __init__(self, kv: kv_format.KvFile):
        self.kv, self.path, self.layers = kv, kv.path, {}
        self.variants = {}
        for name, q in kv.qout.items():
            self.variants[f"{name}.to_q"] = VariantLayer("full", {"diff": q.dq}, rank=0, scale=1.0)
            self.variants[f"{name}.to_out.0"] = VariantLayer("full", {"diff": q.dout, "diff_b": q.dbias}, rank=0,
                                                             scale=1.0)

    @property
    def tokens(self) -> dict:
        return self.kv.tokens


def _kv(file) -> kv_format.KvFile:
    return getattr(file, "kv", file)


class KvFamily(Family):
    name = "kv"

    def detect(self, path, metadata) -> bool:
        return metadata.get(FAMILY_KEY) == kv_format.FAMILY or kv_format.is_kv_layout(path)

    def register(self, store, name, path, *, suffix, token) -> AdapterInfo:
        header = kv_format.read_kv_header(path, kv_base(store), kv_qout_base(store))
        if header.qout and store.targets is not store.all_targets:
            raise AdapterUnsupportedError(
                f"{path}: query/output weights (freeze_model='crossattn', e.g. {next(iter(header.qout.values()))['q']!r}) "
                "are served per row through the LoRA runtime's variant path, which compile mode's fixed pools do not "
                "have (serve it without compile=, or train with freeze='crossattn_kv')")
        placeholders = list(header.placeholders)
        if token is not None and len(placeholders) != 1:
            raise AdapterNameError(f"{path}: token= renames one placeholder, the file defines {placeholders}")
        token_map = ((token, placeholders[0]),) if token is not None else tuple((p, p) for p in placeholders)
        return AdapterInfo(
            name=name,
            path=path,
            family=self.name,
            format=header.format,
            rank=header.rank or 0,
            targets=tuple(header.layers),
            nbytes=header.nbytes,
            token=token_map[0][0] if token_map else None,
            suffix=suffix,
            token_map=token_map,
        )

    def load(self, store, info) -> kv_format.KvFile | ServedKv:
        kvfile = kv_format.read_kv(info.path, kv_base(store), kv_qout_base(store))
        kvfile.layers = {k: _to(v, store.dtype) for k, v in kvfile.layers.items()}
        if not kvfile.qout:
            return kvfile
        cast = (lambda t: t) if store.dtype is None else (lambda t: None if t is None else t.to(store.dtype))  # noqa: E731
        kvfile.qout = {k: kv_format.QOutLayer(cast(q.dq), cast(q.dout), cast(q.dbias)) for k, q in kvfile.qout.items()}
        return ServedKv(kvfile)

    def lora_rows(self, name, scale, file) -> list[tuple[str, float]]:
        # crossattn files: Q/out per row through the LoRA runtime (its variant path, no slot)
        return [(name, scale)] if getattr(file, "variants", None) else []

    def tokens(self, info, file) -> dict:
        file = _kv(file)
        missing = [file_ph for _, file_ph in info.token_map if file_ph not in file.tokens]
        if missing:
            raise AdapterNameError(f"{info.path}: adapter {info.name!r}: token {missing[0]!r} is no longer in the file "
                                   f"(it defines {sorted(file.tokens)}); register it again")
        return {prompt_ph: file.tokens[file_ph] for prompt_ph, file_ph in info.token_map}

    def kv_edit(self, store, rows):
        # adapter -> (its file, [(branch row, scale), ...]): one batched update per adapter and layer
        users: dict[str, tuple] = {}
        for r, row in enumerate(rows):
            for use in row:
                users.setdefault(use.name, (_kv(use.file), []))[1].append((r, use.scale))
        return functools.partial(_add_deltas, users=users)


def _add_deltas(layer: str, attn, k, v, key_embeds, embeds, *, users: dict):
    """Semantics: for every adapter a and every branch row r naming it at scale s:
    k[r] += s·(key_embeds[r] @ ΔW_K,aᵀ), v[r] += s·(embeds[r] @ ΔW_V,aᵀ) (layers the file lacks: 0).
    k, v: Shape [U, L, h]; key_embeds, embeds: Shape [U, L, D]. Returns new (k, v)."""
    for kvfile, rows_scales in users.values():
        delta = kvfile.layers.get(layer)
        if delta is None:
            continue
        rows = torch.tensor([r for r, _ in rows_scales], device=k.device)
        s = torch.tensor([w for _, w in rows_scales], device=k.device, dtype=k.dtype)[:, None, None]
        k = k.index_add(0, rows, s * _project(key_embeds[rows], delta.dk, delta.k_factors))
        v = v.index_add(0, rows, s * _project(embeds[rows], delta.dv, delta.v_factors))
    return k, v


def _project(e, dense, factors):
    """e @ ΔWᵀ with ΔW dense [h, D] or factored u [h, r] @ v [r, D] (never materialized)."""
    if dense is not None:
        return e @ dense.t()
    u, v = factors
    return (e @ v.t()) @ u.t()


def _to(layer, dtype):
    """A KvLayer's tensors in the engine's dtype (dense deltas stay dense, factors stay factors)."""
    if dtype is None:
        return layer
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return type(layer)(
        dk=cast(layer.dk),
        dv=cast(layer.dv),
        k_factors=None if layer.k_factors is None else tuple(map(cast, layer.k_factors)),
        v_factors=None if layer.v_factors is None else tuple(map(cast, layer.v_factors)),
    )
