"""guidance_blend: every backend against an independent per-request loop built on diffusers'
`rescale_noise_cfg`, the branch table, exact CFG equality, layouts, checks and registration.

Triton runs under TRITON_INTERPRET=1 (tests/conftest.py): shapes are small and odd, and the
128-element block size makes every latent span several blocks with a ragged last one, so the
moment merge of the two-pass rescale is exercised. Workspaces and outputs are NaN-poisoned, and
prediction rows no latent uses hold NaN, so a missed write or a stray read cannot pass.
"""

import dataclasses

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from impasto.kernels import (
    BranchTable,
    RequestBranches,
    build_branch_table,
    guidance_blend,
    guidance_blend_ref,
    not_supported_reasons,
)
from impasto.kernels import guidance as guidance_module
from impasto.kernels.testing import assert_close

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_workspaces(monkeypatch):
    monkeypatch.setattr(guidance_module, "_POISON_WORKSPACE", True)


# (backend, blocks): Triton with one block per latent, and with 128-element blocks.
IMPLS = [("reference", None), ("triton", None), ("triton", 128)]


def _set_block(monkeypatch, block_l):
    if block_l is not None:
        monkeypatch.setitem(guidance_module._INTERPRET_BLOCKS, "BLOCK_L", block_l)


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


R = RequestBranches


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple  # (C, H, W) of one prediction
    requests: tuple
    rows: int  # rows of noise; rows no request uses hold NaN


CASES = [
    # 0, 1 and 3 styles; N = 1 and 2; with and without uncond; rescale 0 and 0.7; row 0 unused.
    Case(
        "mixed",
        (4, 13, 11),
        (
            R(start=1, images=2, cfg=7.3, has_uncond=True, style_weights=(4.5, -1.25, 2.0), rescale=0.7),
            R(start=11, images=1, cfg=1.0, has_uncond=False, style_weights=(), rescale=0.0),
            R(start=12, images=1, cfg=5.0, has_uncond=True, style_weights=(4.0,), rescale=0.0),
            R(start=16, images=2, cfg=0.5, has_uncond=False, style_weights=(3.0,), rescale=0.7),
        ),
        rows=20,
    ),
    # No styles at all (S = 0): plain classifier-free guidance, with and without rescale.
    Case(
        "cfg_only",
        (3, 7, 9),
        (
            R(start=0, images=3, cfg=7.5, has_uncond=True, rescale=0.0),
            R(start=6, images=1, cfg=2.1, has_uncond=True, rescale=0.7),
            R(start=8, images=2, cfg=1.0, has_uncond=False, rescale=0.7),
        ),
        rows=10,
    ),
    # Styles without uncond, a style-only batch of one latent per request; rows out of order.
    Case(
        "styles_no_uncond",
        (4, 5, 33),
        (
            R(start=4, images=1, cfg=1.0, has_uncond=False, style_weights=(4.5, 4.5), rescale=0.7),
            R(start=0, images=1, cfg=6.0, has_uncond=True, style_weights=(3.0, -0.5), rescale=0.0),
        ),
        rows=8,
    ),
]


def _noise(case: Case, dtype, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(case.rows, *case.shape, generator=gen) * 0.8 + 0.3
    used = torch.zeros(case.rows, dtype=torch.bool)
    for r in case.requests:
        k = len(r.style_weights)
        used[r.start : r.start + (int(r.has_uncond) + 1 + k) * r.images] = True
    noise[~used] = float("nan")
    return noise.to(dtype)


def _f32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))  # the table stores fp32 scalars


def blend_loop(noise: torch.Tensor, requests) -> torch.Tensor:
    """Independent of the table: per request, diffusers' CFG and rescale_noise_cfg, plus eq. 10's
    style terms, in noise's dtype (so fp64 noise gives the truth, fp16 noise PyTorch's fp16)."""
    outs = []
    for r in requests:
        N, u = r.images, int(r.has_uncond)
        branch = lambda b: noise[r.start + b * N : r.start + (b + 1) * N]  # noqa: E731
        e_c = branch(u)
        e = branch(0) + _f32(r.cfg) * (e_c - branch(0)) if u else e_c
        for i, w in enumerate(r.style_weights):
            e = e + _f32(w) * (branch(u + 1 + i) - e_c)
        if r.rescale > 0:
            e = rescale_noise_cfg(e, e_c, guidance_rescale=_f32(r.rescale))
        outs.append(e)
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_loop_float64(case):
    noise = _noise(case, torch.float64)
    table = build_branch_table(case.requests)
    torch.testing.assert_close(guidance_blend_ref(noise, table), blend_loop(noise, case.requests), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, block_l", IMPLS, ids=lambda v: str(v or "one_block"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_guidance_blend_matches_loop(case, dtype, backend, block_l, monkeypatch):
    _set_block(monkeypatch, block_l)
    noise = _noise(case, dtype)
    table = build_branch_table(case.requests)
    out = torch.full((table.cond_row.shape[0], *case.shape), float("nan"), dtype=dtype)
    result = guidance_blend(noise, table, out=out, backend=backend)
    assert result is out
    expected = blend_loop(noise.double(), case.requests)
    lowp = blend_loop(noise, case.requests) if dtype != torch.float32 else None
    assert_close(out, expected, lowp=lowp, msg=f"{case.name} {dtype} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cfg_without_styles_is_diffusers_cfg_bitwise(backend):
    """No styles, rescale 0, fp32: the pipeline's own line, bit for bit (same op order, fp32
    scalars, no FMA contraction). Without uncond the cond prediction is copied unchanged."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(7, 4, 9, 13, generator=gen)
    requests = [R(start=0, images=2, cfg=7.3, has_uncond=True), R(start=4, images=1, cfg=1.0, has_uncond=False),
                R(start=5, images=1, cfg=11.7, has_uncond=True)]
    out = guidance_blend(noise, build_branch_table(requests), backend=backend)
    u, c = noise[[0, 1, 5]], noise[[2, 3, 6]]
    cfg = torch.tensor([7.3, 7.3, 11.7])[:, None, None, None]
    expected = u + cfg * (c - u)  # pipeline_stable_diffusion: uncond + scale * (text - uncond)
    assert torch.equal(out[[0, 1, 3]], expected)
    assert torch.equal(out[0], noise[0] + 7.3 * (noise[2] - noise[0]))  # a Python-float scale too
    assert torch.equal(out[2], noise[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts(backend):
    """channels_last noise and a strided row view give the same result as contiguous noise."""
    case = CASES[0]
    noise = _noise(case, torch.float32, seed=5)
    table = build_branch_table(case.requests)
    expected = guidance_blend_ref(noise, table)
    cl = noise.to(memory_format=torch.channels_last)
    assert torch.equal(guidance_blend(cl, table, backend=backend), expected)
    wide = torch.full((case.rows, 2, *case.shape), float("nan"))
    wide[:, 1] = noise
    assert torch.equal(guidance_blend(wide[:, 1], table, backend=backend), expected)


def test_rescale_zero_latent_keeps_exact_bits():
    """A latent with rescale 0 next to rescaled ones is the unrescaled blend, exactly."""
    case = CASES[1]
    noise = _noise(case, torch.float32, seed=1)
    table = build_branch_table(case.requests)
    plain = build_branch_table([dataclasses.replace(r, rescale=0.0) for r in case.requests])
    out = guidance_blend(noise, table, backend="triton")
    assert torch.equal(out[:3], guidance_blend(noise, plain, backend="triton")[:3])
    assert not torch.equal(out[3:], guidance_blend(noise, plain, backend="triton")[3:])


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------


def test_table_running_example():
    """The running example in BranchTable's docstring."""
    table = build_branch_table([
        R(start=0, images=2, cfg=7.5, has_uncond=True, style_weights=(4.5, 3.0), rescale=0.7),
        R(start=8, images=1, cfg=1.0, has_uncond=False),
        R(start=9, images=1, cfg=5.0, has_uncond=True, style_weights=(4.0,)),
    ])
    expected = BranchTable(
        uncond_row=torch.tensor([0, 1, -1, 9], dtype=torch.int32),
        cond_row=torch.tensor([2, 3, 8, 10], dtype=torch.int32),
        style_rows=torch.tensor([[4, 6], [5, 7], [-1, -1], [11, -1]], dtype=torch.int32),
        style_weights=torch.tensor([[4.5, 3.0], [4.5, 3.0], [0, 0], [4.0, 0]]),
        cfg=torch.tensor([7.5, 7.5, 1.0, 5.0]),
        rescale=torch.tensor([0.7, 0.7, 0.0, 0.0]),
        stats=torch.tensor([12, 2]),
    )
    for name, got, want in zip(BranchTable._fields, table, expected):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_table_capacity_and_duck_typing():
    """max_styles pads with -1; any object with the attributes works; style_weights is optional."""

    @dataclasses.dataclass
    class Layout:  # like the engine's BranchLayout, which has no style_weights
        start: int
        images: int
        cfg: float
        has_uncond: bool
        rescale: float = 0.0

    table = build_branch_table([Layout(0, 1, 7.5, True)], max_styles=3)
    assert table.style_rows.tolist() == [[-1, -1, -1]] and table.stats.tolist() == [2, 0]
    with pytest.raises(ValueError, match="max_styles"):
        build_branch_table([R(0, 1, 7.5, True, (1.0, 2.0))], max_styles=1)
    noise = _noise(CASES[1], torch.float32)
    padded = build_branch_table(CASES[1].requests, max_styles=2)
    unpadded = build_branch_table(CASES[1].requests)
    assert torch.equal(guidance_blend(noise, padded, backend="triton"), guidance_blend(noise, unpadded, backend="triton"))


def test_inputs_are_checked():
    case = CASES[0]
    noise = _noise(case, torch.float32)
    table = build_branch_table(case.requests)
    with pytest.raises(ValueError, match="reads 20 rows"):
        guidance_blend(noise[:19], table)
    with pytest.raises(ValueError, match="out must be"):
        guidance_blend(noise, table, out=torch.empty(5, *case.shape))
    with pytest.raises(ValueError, match="out must be"):
        guidance_blend(noise, table, out=torch.empty(6, *case.shape, dtype=torch.float16))
    with pytest.raises(ValueError, match="style_weights must be contiguous torch.float32"):
        guidance_blend(noise, table._replace(style_weights=table.style_weights.double()))
    with pytest.raises(ValueError, match="stats"):
        guidance_blend(noise, table._replace(stats=torch.tensor([20])))
    assert not_supported_reasons("guidance_blend", "triton", "cpu", torch.float64)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    case = CASES[0]
    noise = _noise(case, torch.float32).nan_to_num()
    table = build_branch_table(case.requests)
    out = torch.empty(table.cond_row.shape[0], *case.shape)
    torch.library.opcheck(torch.ops.impasto.guidance_blend_.default, (out, noise, *table, backend))


def test_compile_fullgraph_no_recompile():
    """One denoising step around the blend compiles without a graph break; a new table of the
    same shape (another request group) does not recompile."""
    import torch._dynamo

    case = CASES[0]
    noise = _noise(case, torch.float32).nan_to_num()

    def step(noise, table, latents):
        return latents - 0.1 * guidance_blend(noise * 1.0, table)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    latents = torch.randn(6, *case.shape)
    for i, requests in enumerate([case.requests, [dataclasses.replace(r, cfg=r.cfg + 1) for r in case.requests]]):
        table = build_branch_table(requests)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            assert torch.equal(compiled(noise, table, latents), step(noise, table, latents))
