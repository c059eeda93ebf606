"""The conditioning plan: step-invariant work done once per (request, branch) before step 1.

Today: text encodings, tokenized and encoded exactly as diffusers' `encode_prompt` does
(padding to model_max_length, truncation), batched over every branch of every request with
identical prompts encoded once.
"""

from __future__ import annotations

import torch


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    """Semantics: out[i] = text_encoder(tokenize(prompts[i]))[0], the last hidden state.

    prompts: B strings (duplicates are encoded once).
    Returns Shape [B, L, D] with L = tokenizer.model_max_length, D = text width.
    """
    unique = list(dict.fromkeys(prompts))
    tokens = tokenizer(
        unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    with torch.inference_mode():
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    index = torch.tensor([unique.index(p) for p in prompts], device=hidden.device)
    return hidden[index]
