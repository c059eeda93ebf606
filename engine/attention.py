"""Cross-attention (attn2) that reads its K and V from the conditioning plan.

Text encodings do not change across denoising steps, so each attn2 layer's K and V — with the
request's K/V-affecting adapters folded in — are computed once per (request, branch) by the plan
and reused by every step; diffusers recomputes `to_k`/`to_v` every step. The K/V come from the
engine's one BatchState (engine/batch.py); rows padded to the longest row are masked. When no
step is running the processor defers to diffusers' own (SDPA) processor, so the base model
behaves as before. Where the batch state holds image tokens (encoder adapters), the same query
also attends to their planned K'/V', scaled per row (IP-Adapter's decoupled cross-attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0


class PlannedCrossAttnProcessor:
    """AttnProcessor2_0 for attn2, with K, V [rows, L, inner] and the key mask taken from
    `state.planned_kv(name)` (a BatchState)."""

    def __init__(self, name: str, state, fallback=None):
        self.name = name
        self.state = state
        self.fallback = fallback or AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        kv = self.state.planned_kv(self.name)
        if kv is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        key, value, key_mask = kv
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if key.shape[0] != batch:
            raise RuntimeError(f"{self.name}: planned K/V have {key.shape[0]} rows, the step has {batch}")
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if key_mask is not None:  # padded keys of shorter rows: never attended
            attention_mask = key_mask if attention_mask is None else attention_mask.masked_fill(
                ~key_mask, float("-inf"))
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        image = self.state.planned_image(self.name)
        if image is not None:  # decoupled cross-attention: the same Q on the image tokens' K'/V'
            hidden_states = hidden_states + image_attention(query, *image, attn.heads)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def image_attention(query, key, value, key_mask, scale, heads: int) -> torch.Tensor:
    """Semantics: λ_r · softmax(Q_r K'_rᵀ/√d) V'_r per row r (IP-Adapter's image branch, before to_out).

    query: Shape [B, heads, N, d]; key, value: Shape [B, L_img, heads·d]; key_mask: bool
    [B, 1, 1, L_img] or None; scale: Shape [B, 1, 1]. Returns Shape [B, N, heads·d].
    """
    batch, _, _, head_dim = query.shape
    key = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask, dropout_p=0.0, is_causal=False)
    return scale * out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)


def cross_attention_layers(unet) -> dict[str, torch.nn.Module]:
    """Every cross-attention module of the UNet, by name, in module order."""
    return {
        name: m
        for name, m in unet.named_modules()
        if type(m).__name__ == "Attention" and getattr(m, "is_cross_attention", False)
    }


def install_planned_attention(unet, state) -> dict[str, torch.nn.Module]:
    """Give every attn2 a PlannedCrossAttnProcessor (its current processor as the fallback)."""
    layers = cross_attention_layers(unet)
    for name, m in layers.items():
        m.set_processor(PlannedCrossAttnProcessor(name, state, m.processor))
    return layers


def uninstall_planned_attention(layers: dict) -> None:
    """Give every attn2 back the processor it had before `install_planned_attention`."""
    for m in layers.values():
        if isinstance(m.processor, PlannedCrossAttnProcessor):
            m.set_processor(m.processor.fallback)
