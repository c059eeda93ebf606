"""rank1_edit: every backend against the reference, gradients, registration, compile.

Triton runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are small and odd and the
kernels' blocks are large. Outputs and workspaces are NaN-poisoned so a missed write cannot pass.
"""

import dataclasses

import pytest
import torch

from impasto.kernels import rank1_edit, rank1_edit_ref, use_backend
from impasto.kernels import rank1 as rank1_module
from impasto.kernels.testing import assert_close

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_workspaces(monkeypatch):
    monkeypatch.setattr(rank1_module, "_POISON_WORKSPACE", True)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rows: int
    T: int
    D: int
    N: int
    M: int
    unused: str  # which concept slots are unused: "none", "some" (mixed per row), "row" (a whole row)


CASES = [
    Case("one", rows=3, T=37, D=96, N=40, M=1, unused="none"),
    Case("several", rows=2, T=29, D=80, N=56, M=3, unused="none"),
    Case("unused", rows=4, T=23, D=48, N=17, M=3, unused="some"),
    Case("cfg", rows=4, T=77, D=33, N=72, M=2, unused="row"),  # the unconditional rows have no concept
    Case("one_token", rows=2, T=1, D=130, N=20, M=2, unused="some"),
]


def _problem(case: Case, dtype, seed=0, weights_dtype=None):
    """(base, e, P, WU, G, O, beta, tau, used [rows, M] bool); unused slots have zero P, WU, O."""
    gen = torch.Generator().manual_seed(seed)
    rows, T, D, N, M = case.rows, case.T, case.D, case.N, case.M

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    e = rnd(rows, T, D)
    base = rnd(rows, T, N)
    P = rnd(rows, M, D, scale=D**-0.5)
    WU = rnd(rows, M, N)
    # G·e lands around the gate's bias, so the sigmoid is exercised away from saturation
    G = rnd(rows, M, D, scale=0.5 * D**-0.5)
    O = rnd(rows, M, N)
    beta = (0.4 + 0.4 * torch.rand(rows, M, generator=gen)).float()
    tau = (0.1 + 0.3 * torch.rand(rows, M, generator=gen)).float()
    used = torch.ones(rows, M, dtype=torch.bool)
    if case.unused == "some":
        used[0, -1] = False
        used[-1, 0] = False
    elif case.unused == "row":
        used[rows // 2 :] = False
    G = torch.where(used[:, :, None], G, rnd(rows, M, D))  # unused G may hold anything finite
    P, WU, O = (torch.where(used[:, :, None], t, 0.0) for t in (P, WU, O))
    wdt = dtype if weights_dtype is None else weights_dtype
    return (base.to(dtype), e.to(dtype), P.to(wdt), WU.to(wdt), G.to(wdt), O.to(wdt), beta, tau, used)


def _loop_reference(base, e, P, WU, G, O, beta, tau):
    """Per-row, per-token, per-slot Python loop in fp64, straight from the docstring's Semantics."""
    out = base.double().clone()
    for r in range(base.shape[0]):
        for t in range(base.shape[1]):
            x = e[r, t].double()
            for m in range(P.shape[1]):
                a = torch.dot(P[r, m].double(), x)
                s = torch.dot(G[r, m].double(), x)
                gate = torch.sigmoid((s - float(beta[r, m])) / float(tau[r, m]))
                out[r, t] += -a * WU[r, m].double() + gate * O[r, m].double()
    return out


def _expected(base, e, P, WU, G, O, beta, tau):
    """fp64 ground truth from the (low-precision) inputs, and PyTorch's own low-precision result."""
    exact = rank1_edit_ref(base.double(), e.double(), P.double(), WU.double(), G.double(), O.double(), beta, tau)
    lowp = None
    if e.dtype != torch.float32:
        lowp = rank1_edit_ref(base, e, P.to(e.dtype), WU.to(e.dtype), G.to(e.dtype), O.to(e.dtype), beta, tau, upcast=False)
    return exact, lowp


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def test_reference_matches_loop():
    for case in CASES[:3]:
        *inputs, _ = _problem(case, torch.float64)
        torch.testing.assert_close(rank1_edit_ref(*inputs), _loop_reference(*inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_rank1_edit_matches_reference(case, dtype, backend):
    *inputs, _ = _problem(case, dtype)
    exact, lowp = _expected(*inputs)
    out = rank1_edit(*inputs, backend=backend)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_close(out, exact, lowp=lowp, msg=f"{case} {dtype} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_concept_tensors_with_low_precision_activations(dtype, backend):
    """The engine keeps P, G (from C⁻¹) in fp32 while the model runs in fp16/bf16."""
    *inputs, _ = _problem(CASES[1], dtype, seed=7, weights_dtype=torch.float32)
    exact, _ = _expected(*inputs)
    lowp = rank1_edit_ref(*inputs[:2], *(t.to(dtype) for t in inputs[2:6]), *inputs[6:], upcast=False)
    assert_close(rank1_edit(*inputs, backend=backend), exact, lowp=lowp, msg=f"{dtype} {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_slots_contribute_nothing(backend):
    """A row's unused slots (zero P, WU, O; arbitrary G) change nothing: the same as dropping them
    (they would move the output by O(1) if they leaked), and a row with no concept at all gives
    back base exactly."""
    case = CASES[2]
    base, e, P, WU, G, O, beta, tau, used = _problem(case, torch.float32, seed=3)
    out = rank1_edit(base, e, P, WU, G, O, beta, tau, backend=backend)
    for r in range(case.rows):
        keep = used[r].nonzero().flatten()
        one = [t[r : r + 1, keep] for t in (P, WU, G, O, beta, tau)]
        alone = rank1_edit(base[r : r + 1], e[r : r + 1], *one, backend=backend)
        # same numbers up to summation order (the reduction over slots has another length)
        assert_close(out[r : r + 1], alone.double(), msg=f"row {r}")
    cfg = CASES[3]
    base, e, P, WU, G, O, beta, tau, used = _problem(cfg, torch.float32, seed=4)
    out = rank1_edit(base, e, P, WU, G, O, beta, tau, backend=backend)
    none = ~used.any(dim=1)
    assert none.any() and torch.equal(out[none], base[none])
    assert not torch.equal(out[~none], base[~none])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """base a slice of a fused K|V projection, e a transposed view: strides are honoured."""
    case = CASES[1]
    base, e, P, WU, G, O, beta, tau, _ = _problem(case, torch.float32, seed=5)
    fused = torch.randn(case.rows, case.T, 2 * case.N)
    fused[:, :, case.N :] = base
    et = e.transpose(1, 2).contiguous().transpose(1, 2)
    assert not et.is_contiguous()
    got = rank1_edit(fused[:, :, case.N :], et, P, WU, G, O, beta, tau, backend=backend)
    assert_close(got, rank1_edit_ref(base, e, P, WU, G, O, beta, tau))


def test_inputs_are_checked():
    base, e, P, WU, G, O, beta, tau, _ = _problem(CASES[0], torch.float32)
    with pytest.raises(ValueError, match="P must be"):
        rank1_edit(base, e, P[:, :, 1:], WU, G, O, beta, tau)
    with pytest.raises(ValueError, match="O must be"):
        rank1_edit(base, e, P, WU, G, O[:, :, 1:], beta, tau)
    with pytest.raises(ValueError, match="tau must be float32"):
        rank1_edit(base, e, P, WU, G, O, beta, tau.double())
    with pytest.raises(ValueError, match="share a dtype"):
        rank1_edit(base.half(), e, P, WU, G, O, beta, tau)
    with pytest.raises(ValueError, match="P, WU, G, O must share"):
        rank1_edit(base, e, P, WU.half(), G, O, beta, tau)


def test_too_many_slots_has_no_triton_kernel():
    case = Case("wide", rows=1, T=3, D=16, N=16, M=65, unused="none")
    *inputs, _ = _problem(case, torch.float32)
    with pytest.raises(ValueError, match="No suitable kernel"):
        rank1_edit(*inputs, backend="triton")


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

GRAD_NAMES = ["base", "e", "P", "WU", "G", "O"]


def _grads(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:6]]
    fn(*leaves, *inputs[6:]).backward(dy)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3]], ids=lambda c: c.name)
def test_rank1_edit_gradients(case, dtype, backend):
    *inputs, used = _problem(case, dtype, seed=11)
    dy = torch.randn(case.rows, case.T, case.N, generator=torch.Generator().manual_seed(12)).to(dtype)
    got = _grads(lambda *t: rank1_edit(*t, backend=backend), inputs, dy)
    exact = _grads(rank1_edit_ref, [t.double() for t in inputs[:6]] + inputs[6:], dy.double())
    # Weight gradients reduce over every token of the row, where fp32 rounding alone exceeds the
    # elementwise fp32 tolerance: the 2x-PyTorch rule applies to every dtype, PyTorch's own
    # computation in `dtype` being the low-precision reference.
    lowp = _grads(lambda *t: rank1_edit_ref(*t, upcast=False), inputs, dy)
    for name, g, x, lp in zip(GRAD_NAMES, got, exact, lowp):
        assert g.dtype == dtype, name
        assert_close(g, x, lowp=lp, msg=f"d{name} {case} {dtype} {backend}")
    assert torch.equal(got[0], dy)


def test_gradients_of_unused_slots():
    """Unused slots (zero P, WU, O): dP = Σ_t (−dy·WU) e, dWU = −Σ_t (P·e) dy and
    dG = Σ_t (dy·O) σ'/τ e are exactly zero, while dO = Σ_t σ·dy is not: an unused slot's O still
    receives a gradient through its gate, so the engine must not train unused slots' O."""
    case = CASES[2]
    *inputs, used = _problem(case, torch.float32, seed=13)
    dy = torch.randn(case.rows, case.T, case.N, generator=torch.Generator().manual_seed(14))
    for backend in BACKENDS:
        dbase, de, dP, dWU, dG, dO = _grads(lambda *t: rank1_edit(*t, backend=backend), inputs, dy)
        assert torch.equal(dP[~used], torch.zeros_like(dP[~used])), backend
        assert torch.equal(dWU[~used], torch.zeros_like(dWU[~used])), backend
        assert torch.equal(dG[~used], torch.zeros_like(dG[~used])), backend  # O = 0: no gate gradient
        assert dO[~used].abs().min() > 0, backend


def test_gradcheck_reference_float64():
    case = Case("gc", rows=2, T=5, D=6, N=7, M=2, unused="some")
    *inputs, _ = _problem(case, torch.float64, seed=5)
    leaves = [t.clone().requires_grad_() for t in inputs[:6]]
    beta, tau = inputs[6:]
    # the registered backward formulas of the op, and the plain reference's autograd
    assert torch.autograd.gradcheck(lambda *t: rank1_edit(*t, beta, tau, backend="reference"), leaves)
    assert torch.autograd.gradcheck(lambda *t: rank1_edit_ref(*t, beta, tau), leaves)


# ----------------------------------------------------------------------------------------------
# Registration and compile
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    case = Case("oc", rows=2, T=9, D=20, N=18, M=2, unused="some")
    *inputs, _ = _problem(case, torch.float32, seed=2)
    ops = torch.ops.impasto
    leaves = [t.clone().requires_grad_() for t in inputs[:6]]
    torch.library.opcheck(ops.rank1_edit.default, (*leaves, *inputs[6:], backend))
    dy = torch.randn(case.rows, case.T, case.N)
    torch.library.opcheck(ops.rank1_edit_backward.default, (dy, *inputs[1:], backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """K and V of one layer in one compiled function, training o*_V and e: no graph break, and new
    concept tensors of the same shapes do not recompile."""
    import torch._dynamo

    case = Case("c", rows=2, T=13, D=24, N=20, M=2, unused="some")

    def step(e, W_k, W_v, k_ops, v_ops):
        k = rank1_edit(e @ W_k.T, e, *k_ops)
        v = rank1_edit(e @ W_v.T, e, *v_ops)
        return (k * v).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    W_k, W_v = torch.randn(case.N, case.D), torch.randn(case.N, case.D)
    with use_backend(backend):
        for seed in (0, 1):
            _, e, *k_ops, _ = _problem(case, torch.float32, seed=seed)
            _, _, *v_ops, _ = _problem(case, torch.float32, seed=seed + 10)
            e1, e2 = e.clone().requires_grad_(), e.clone().requires_grad_()
            o1, o2 = v_ops[3].clone().requires_grad_(), v_ops[3].clone().requires_grad_()
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                out = compiled(e1, W_k, W_v, k_ops, [*v_ops[:3], o1, *v_ops[4:]])
            ref = step(e2, W_k, W_v, k_ops, [*v_ops[:3], o2, *v_ops[4:]])
            assert_close(out, ref.detach())
            out.sum().backward()
            ref.sum().backward()
            assert_close(e1.grad, e2.grad)
            assert_close(o1.grad, o2.grad)
