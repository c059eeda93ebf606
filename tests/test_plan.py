"""The conditioning plan: attn2 K/V are computed once per (request, branch), not every step."""

import numpy as np
import torch

import impasto
from impasto.attention import cross_attention_layers


def _count_kv_projections(unet):
    """Rows that pass through every attn2 to_k / to_v, per call."""
    calls, handles = [], []
    for name, attn in cross_attention_layers(unet).items():
        for proj in (attn.to_k, attn.to_v):
            handles.append(proj.register_forward_hook(lambda m, i, o, n=name: calls.append((n, i[0].shape[0]))))
    return calls, handles


def test_attn2_kv_once_per_branch_and_outputs_unchanged(engine, pipe):
    layers = cross_attention_layers(engine.base.unet)
    assert len(layers) > 0
    reqs = [
        impasto.Request("a red star", seed=1, steps=5, output_type="np"),  # uncond "" + cond
        impasto.Request("a blue square", seed=2, steps=5, guidance=1.0, output_type="np", num_images=2),
        impasto.Request("a red star", seed=3, steps=5, output_type="np"),  # same branches as the first
    ]
    calls, handles = _count_kv_projections(engine.base.unet)
    try:
        outs = engine.generate_batch(reqs)
    finally:
        for h in handles:
            h.remove()
    # one call per projection per layer, over the 3 distinct branches: "", "a red star", "a blue square"
    assert len(calls) == 2 * len(layers)
    assert all(rows == 3 for _, rows in calls)
    for req, out in zip(reqs, outs):
        g = torch.Generator("cpu").manual_seed(req.seed)
        ref = pipe(req.prompt, num_inference_steps=req.steps, guidance_scale=req.guidance, generator=g,
                   num_images_per_prompt=req.num_images, output_type="np").images
        assert float(np.abs(out.images - ref).max()) <= 1e-3


def test_diffusers_recomputes_every_step(pipe):
    """The baseline the plan saves: diffusers runs attn2 K/V once per step."""
    calls, handles = _count_kv_projections(pipe.unet)
    try:
        pipe("a red star", num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 2 * len(cross_attention_layers(pipe.unet)) * 5
