"""The native backend (csrc/ + bindings/): every op against the references, on the problems of the
kernel tests, plus gradients, registration (opcheck, fake kernels, compile), checks and dispatch.

The session fixture builds the CPU extension once per test run into a cached folder (ninja
rebuilds only what changed). CUDA variants run wherever torch sees a GPU (marked `cuda`).
"""

import pytest
import torch

import test_guidance_kernel as G
import test_lora_kernel as L
import test_rank1_kernel as R1
from impasto.kernels import (
    build_branch_table,
    dispatch,
    guidance_blend,
    guidance_blend_ref,
    lora_apply,
    lora_delta,
    lora_delta_ref,
    lora_meta,
    native,
    rank1_edit,
    rank1_edit_ref,
)
from impasto.kernels.testing import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
# (backend, device): native on CPU everywhere; on CUDA every backend, so a GPU run
# (benchmarks/gpu_check.sh: pytest -m cuda) checks Triton, native and reference there.
IMPLS = [("native", "cpu")] + [pytest.param(b, "cuda", marks=_CUDA, id=f"{b}-cuda") for b in ("native", "triton", "reference")]


@pytest.fixture(scope="session", autouse=True)
def native_lib():
    """The extension, built once per run (CPU; CUDA too where torch has CUDA and a toolkit)."""
    if not native.loaded() and not native.load():
        native.build()
    assert native.loaded(), native.reasons("cpu")
    return native.origin()


@pytest.fixture(autouse=True)
def _native_poison():
    torch.ops.impasto_native._set_poison(True)  # outputs the kernels allocate start as NaN
    yield
    torch.ops.impasto_native._set_poison(False)


def _cuda_ok(device, backend="native"):
    if device == "cuda" and backend == "native" and not native.has_cuda_kernels():
        pytest.fail("CUDA is present but the native extension was built without its CUDA part")


# ----------------------------------------------------------------------------------------------
# lora_apply / lora_delta
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", L.CASES, ids=lambda c: c.popularity)
def test_lora_apply(case, dtype, backend, device):
    _cuda_ok(device, backend)
    y0, x, A, B, slots, scales = L._problem(case, dtype)
    unused = ~(slots >= 0).any(dim=1)
    y0[unused, 0, 0] = -0.0  # rows without an adapter come back bit for bit
    y0[unused, -1, -1] = float("nan")
    exact, lowp = L._expected(y0, x, A, B, slots, scales)
    y = y0.clone().to(device)
    args = [t.to(device) for t in (x, A, B, slots, scales)]
    assert lora_apply(y, *args, backend=backend) is y
    y = y.cpu()
    assert_close(y, exact, lowp=lowp, msg=f"{case} {dtype} {device}")
    assert torch.equal(L._bits(y[unused]), L._bits(y0[unused]))


def test_lora_apply_float64_matches_loop():
    for case in L.CASES:
        y0, x, A, B, slots, scales = L._problem(case, torch.float64)
        y = lora_apply(y0.clone(), x, A, B, slots, scales, backend="native")
        torch.testing.assert_close(y, y0 + L._loop_reference(x, A, B, slots, scales), rtol=1e-12, atol=1e-12)


def test_lora_strided_views():
    case = L.Case("zipf", rows=4, T=21, K=40, N=24, R=8, S=5, M=2)
    _, x, A, B, slots, scales = L._problem(case, torch.float32, seed=3)
    fused = torch.randn(case.rows, case.T, 3 * case.N)
    y = fused[:, :, case.N : 2 * case.N]
    before = fused.clone()
    exact, _ = L._expected(y, x, A, B, slots, scales)
    lora_apply(y, x.transpose(1, 2).contiguous().transpose(1, 2), A.transpose(1, 2).contiguous().transpose(1, 2),
               B, slots, scales, backend="native")
    assert_close(y, exact)
    assert torch.equal(fused[:, :, : case.N], before[:, :, : case.N])
    assert torch.equal(fused[:, :, 2 * case.N :], before[:, :, 2 * case.N :])


@pytest.mark.parametrize("backend, device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [L.CASES[2], L.CASES[3], L.CASES[5]], ids=lambda c: c.popularity)
def test_lora_delta_gradients(case, dtype, backend, device):
    _cuda_ok(device, backend)
    _, x, A, B, slots, scales = L._problem(case, dtype, seed=11)
    dy = torch.randn(case.rows, case.T, case.N, generator=torch.Generator().manual_seed(12)).to(dtype)
    s, sc = slots.to(device), scales.to(device)
    got = L._grads(lambda *t: lora_delta(*t, s, sc, backend=backend), x.to(device), A.to(device), B.to(device), dy.to(device))
    exact = L._grads(lambda *t: lora_delta_ref(*t, slots, scales), x.double(), A.double(), B.double(), dy.double())
    lowp = L._grads(lambda *t: lora_delta_ref(*t, slots, scales, upcast=False), x, A, B, dy)
    unused = torch.ones(case.S, dtype=torch.bool)
    unused[slots[slots >= 0].long()] = False
    for name, g, e, lp in zip("x A B".split(), got, exact, lowp):
        g = g.cpu()
        assert g.dtype == dtype
        assert_close(g, e, lowp=lp, msg=f"d{name} {case} {dtype} {backend} {device}")
        if name != "x":
            assert torch.equal(g[unused], torch.zeros_like(g[unused])), f"d{name} of unused slots"


def test_lora_gradcheck_float64():
    case = L.Case("several", rows=3, T=5, K=6, N=7, R=3, S=4, M=2)
    _, x, A, B, slots, scales = L._problem(case, torch.float64, seed=5, poison_unused=False)
    slots[1, 1] = -1
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    assert torch.autograd.gradcheck(lambda *t: lora_delta(*t, slots, scales, backend="native"), leaves)


def test_lora_opcheck_and_fake():
    case = L.Case("zipf", rows=3, T=11, K=24, N=20, R=8, S=4, M=2)
    y, x, A, B, slots, scales = L._problem(case, torch.float32, seed=2, poison_unused=False)
    meta = lora_meta(slots, A.shape[0])
    ops = torch.ops.impasto_native
    torch.library.opcheck(ops.lora_apply_.default, (y.clone(), x, A, B, slots, scales, *meta))
    torch.library.opcheck(ops.lora_delta.default, (x, A, B, slots, scales, *meta))
    dy = torch.randn(case.rows, case.T, case.N)
    torch.library.opcheck(ops.lora_delta_backward.default, (dy, x, A, B, slots, scales, *meta))
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.library.opcheck(torch.ops.impasto.lora_delta.default, (*leaves, slots, scales, *meta, "native"))


def test_lora_compile_fullgraph():
    case = L.Case("zipf", rows=3, T=11, K=24, N=20, R=8, S=4, M=2)
    y, x, A, B, slots, scales = L._problem(case, torch.float32, seed=4, poison_unused=False)
    meta = lora_meta(slots, A.shape[0])

    def step(y, x):
        torch.ops.impasto_native.lora_apply_(y, x, A, B, slots, scales, *meta)
        return y * 2

    want = step(y.clone(), x)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(y.clone(), x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_lora_bad_input_is_named():
    _, x, A, B, slots, scales = L._problem(L.CASES[0], torch.float32, poison_unused=False)
    meta = lora_meta(slots, A.shape[0])
    y = torch.zeros(x.shape[0], x.shape[1], B.shape[2])
    ops = torch.ops.impasto_native
    with pytest.raises(RuntimeError, match="slots must be int32"):
        ops.lora_apply_(y, x, A, B, slots.long(), scales, *meta)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.lora_apply_(y, x, A.double(), B, slots, scales, *meta)
    with pytest.raises(RuntimeError, match=r"y must be"):
        ops.lora_apply_(y[:, :-1], x, A, B, slots, scales, *meta)
    with pytest.raises(RuntimeError, match=r"pools must be"):
        ops.lora_apply_(y, x, A[:, :-1], B, slots, scales, *meta)


# ----------------------------------------------------------------------------------------------
# guidance_blend
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", G.CASES, ids=lambda c: c.name)
def test_guidance_blend(case, dtype, backend, device):
    _cuda_ok(device, backend)
    noise = G._noise(case, dtype)
    exact = G.blend_loop(noise.double(), case.requests)
    lowp = G.blend_loop(noise, case.requests) if dtype != torch.float32 else None
    table = build_branch_table(case.requests, device=device)
    out = torch.full((exact.shape[0], *case.shape), float("nan"), dtype=dtype, device=device)
    guidance_blend(noise.to(device), table, out=out, backend=backend)
    assert_close(out.cpu(), exact, lowp=lowp, msg=f"{case.name} {dtype} {backend} {device}")


def test_guidance_float64_and_cfg_bitwise():
    for case in G.CASES:
        noise = G._noise(case, torch.float64)
        table = build_branch_table(case.requests)
        got = guidance_blend(noise, table, backend="native")
        torch.testing.assert_close(got, G.blend_loop(noise, case.requests), rtol=1e-12, atol=1e-12)
    # no styles, no rescale, fp32: diffusers' e_u + cfg * (e_c - e_u), bit for bit
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(6, 4, 9, 7, generator=gen)
    table = build_branch_table([G.R(start=0, images=3, cfg=7.5, has_uncond=True)])
    e_u, e_c = noise[:3], noise[3:]
    want = e_u + G._f32(7.5) * (e_c - e_u)
    assert torch.equal(guidance_blend(noise, table, backend="native"), want)
    assert torch.equal(guidance_blend(noise, table, backend="native"), guidance_blend_ref(noise, table))


def test_guidance_layouts():
    case = G.CASES[0]
    noise = G._noise(case, torch.float32).to(memory_format=torch.channels_last)
    table = build_branch_table(case.requests)
    assert_close(guidance_blend(noise, table, backend="native"), G.blend_loop(noise.double(), case.requests))


def test_guidance_opcheck_and_bad_input():
    case = G.CASES[1]
    noise = G._noise(case, torch.float32).nan_to_num()
    table = build_branch_table(case.requests)
    out = torch.empty(table.cond_row.shape[0], *case.shape)
    torch.library.opcheck(torch.ops.impasto_native.guidance_blend_.default, (out, noise, *table))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        torch.ops.impasto_native.guidance_blend_(out[:-1], noise, *table)
    with pytest.raises(RuntimeError, match="the table reads"):
        torch.ops.impasto_native.guidance_blend_(out, noise[:2], *table)


# ----------------------------------------------------------------------------------------------
# rank1_edit
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", R1.CASES, ids=lambda c: c.name)
def test_rank1_edit(case, dtype, backend, device):
    _cuda_ok(device, backend)
    *inputs, _ = R1._problem(case, dtype)
    exact, lowp = R1._expected(*inputs)
    got = rank1_edit(*[t.to(device) for t in inputs], backend=backend)
    assert got.dtype == dtype
    assert_close(got.cpu(), exact, lowp=lowp, msg=f"{case} {dtype} {device}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rank1_fp32_concepts_low_precision_activations(dtype):
    *inputs, _ = R1._problem(R1.CASES[1], dtype, weights_dtype=torch.float32)
    exact, lowp = R1._expected(*inputs)
    assert_close(rank1_edit(*inputs, backend="native"), exact, lowp=lowp)


def test_rank1_float64_matches_loop():
    *inputs, _ = R1._problem(R1.CASES[2], torch.float64)
    got = rank1_edit(*inputs, backend="native")
    torch.testing.assert_close(got, R1._loop_reference(*inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, device", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [R1.CASES[1], R1.CASES[2], R1.CASES[3]], ids=lambda c: c.name)
def test_rank1_gradients(case, dtype, backend, device):
    _cuda_ok(device, backend)
    *inputs, _ = R1._problem(case, dtype, seed=11)
    dy = torch.randn(case.rows, case.T, case.N, generator=torch.Generator().manual_seed(12)).to(dtype)
    got = R1._grads(lambda *t: rank1_edit(*t, backend=backend), [t.to(device) for t in inputs], dy.to(device))
    exact = R1._grads(rank1_edit_ref, [t.double() for t in inputs[:6]] + inputs[6:], dy.double())
    lowp = R1._grads(lambda *t: rank1_edit_ref(*t, upcast=False), inputs, dy)
    for name, g, x, lp in zip(R1.GRAD_NAMES, got, exact, lowp):
        assert g.dtype == dtype, name
        assert_close(g.cpu(), x, lowp=lp, msg=f"d{name} {case} {dtype} {backend} {device}")


def test_rank1_gradcheck_and_opcheck():
    case = R1.Case("gc", rows=2, T=5, D=6, N=7, M=2, unused="some")
    *inputs, _ = R1._problem(case, torch.float64, seed=5)
    leaves = [t.clone().requires_grad_() for t in inputs[:6]]
    beta, tau = inputs[6:]
    assert torch.autograd.gradcheck(lambda *t: rank1_edit(*t, beta, tau, backend="native"), leaves)
    *inputs, _ = R1._problem(R1.Case("oc", rows=2, T=9, D=20, N=18, M=2, unused="some"), torch.float32, seed=2)
    ops = torch.ops.impasto_native
    torch.library.opcheck(ops.rank1_edit.default, tuple(inputs))
    dy = torch.randn(2, 9, 18)
    torch.library.opcheck(ops.rank1_edit_backward.default, (dy, *inputs[1:]))


def test_rank1_output_is_fully_written():
    """With poisoning on, the kernel's own output starts as NaN: every element must be written."""
    *inputs, _ = R1._problem(R1.CASES[3], torch.float32)
    got = torch.ops.impasto_native.rank1_edit(*inputs)
    assert not got.isnan().any()


def test_rank1_bad_input_is_named():
    *inputs, _ = R1._problem(R1.CASES[0], torch.float32)
    base, e, P, WU, G_, O, beta, tau = inputs
    with pytest.raises(RuntimeError, match="beta and tau must be float32"):
        torch.ops.impasto_native.rank1_edit(base, e, P, WU, G_, O, beta.double(), tau)
    with pytest.raises(RuntimeError, match="P must be"):
        torch.ops.impasto_native.rank1_edit(base, e, P[:, :, :-1], WU, G_, O, beta, tau)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------


def test_dispatch_reasons_and_default(monkeypatch):
    assert dispatch.not_supported_reasons("lora_apply", "native", "cpu", torch.bfloat16) == []
    assert dispatch.not_supported_reasons("guidance_blend", "native", "cpu", torch.float64) == []
    assert "no native implementation" in " ".join(dispatch.not_supported_reasons("_nope", "native", "cpu"))
    # the CPU default follows NATIVE_CPU_DEFAULT, only while the extension is loaded
    monkeypatch.setattr(dispatch, "NATIVE_CPU_DEFAULT", frozenset({"rank1_edit"}))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select("rank1_edit", "cpu", torch.float32) is dispatch.Backend.NATIVE
    assert dispatch.select("lora_apply", "cpu", torch.float32) is dispatch.Backend.REFERENCE
    monkeypatch.setitem(native._state, "origin", None)
    monkeypatch.setitem(native._state, "error", "not loaded: test")
    monkeypatch.setattr(native, "load", lambda: False)
    assert dispatch.select("rank1_edit", "cpu", torch.float32) is dispatch.Backend.REFERENCE
    reasons = dispatch.not_supported_reasons("lora_apply", "native", "cpu")
    assert reasons == ["the native extension is not loaded: test"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_opcheck_and_cfg_bitwise():
    _cuda_ok("cuda")
    ops, dev = torch.ops.impasto_native, "cuda"
    case = L.Case("zipf", rows=3, T=11, K=24, N=20, R=8, S=4, M=2)
    y, x, A, B, slots, scales = (t.to(dev) for t in L._problem(case, torch.float16, seed=2, poison_unused=False))
    meta = lora_meta(slots, A.shape[0])
    torch.library.opcheck(ops.lora_apply_.default, (y.clone(), x, A, B, slots, scales, *meta))
    *inputs, _ = R1._problem(R1.Case("oc", rows=2, T=9, D=20, N=18, M=2, unused="some"), torch.bfloat16, seed=2)
    torch.library.opcheck(ops.rank1_edit.default, tuple(t.to(dev) for t in inputs))
    noise = torch.randn(6, 4, 9, 7, generator=torch.Generator().manual_seed(3)).to(dev)
    table = build_branch_table([G.R(start=0, images=3, cfg=7.5, has_uncond=True)], device=dev)
    torch.library.opcheck(ops.guidance_blend_.default, (torch.empty(3, 4, 9, 7, device=dev), noise, *table))
    e_u, e_c = noise[:3], noise[3:]
    assert torch.equal(guidance_blend(noise, table, backend="native"), e_u + G._f32(7.5) * (e_c - e_u))


# ----------------------------------------------------------------------------------------------
# The reference's runs-of-rows path (M = 1 on CPU), which the engine's one-adapter rows take
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous_y", [True, False])
def test_reference_runs_of_rows(dtype, contiguous_y):
    """Runs of rows sharing a slot (scales differing inside a run), rows without an adapter between
    them, NaN in every pool slot no row uses: equal to the per-row loop, untouched rows bit-exact."""
    from impasto.kernels import lora as lora_module

    case = L.Case("all_none", rows=9, T=13, K=24, N=20, R=8, S=6, M=1)  # slots set below
    _, x, A, B, _, _ = L._problem(case, dtype, poison_unused=False)
    slots = torch.tensor([[2], [2], [2], [-1], [4], [4], [2], [-1], [-1]], dtype=torch.int32)
    scales = torch.linspace(0.3, 1.7, 9)[:, None].float()
    A[[0, 1, 3, 5]], B[[0, 1, 3, 5]] = float("nan"), float("nan")
    assert lora_module._segments(slots) == [(2, 0, 3), (4, 4, 6), (2, 6, 7)]
    fused = torch.randn(case.rows, case.T, 2 * case.N, dtype=dtype)
    y = fused[:, :, : case.N] if not contiguous_y else fused[:, :, : case.N].contiguous()
    y0 = y.clone()
    lora_apply(y, x, A, B, slots, scales, backend="reference")
    want = y0.double() + L._loop_reference(x, A, B, slots, scales)
    assert_close(y, want.to(dtype) if dtype == torch.float64 else want)
    unused = (slots[:, 0] < 0)
    assert torch.equal(L._bits(y[unused]), L._bits(y0[unused]))
