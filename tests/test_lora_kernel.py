"""lora_apply / lora_delta: every backend against the reference, gradients, registration, compile.

Triton runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes are small and odd and the
kernels' blocks are large. Workspaces are NaN-poisoned so a missed write cannot pass.
"""

import dataclasses

import pytest
import torch

from impasto.kernels import lora_apply, lora_delta, lora_delta_ref, lora_meta, use_backend
from impasto.kernels import lora as lora_module
from impasto.kernels.testing import assert_close

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_workspaces(monkeypatch):
    monkeypatch.setattr(lora_module, "_POISON_WORKSPACE", True)


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    popularity: str  # how rows pick slots (punica's get_lora_lens, per row instead of per token)
    rows: int
    T: int
    K: int
    N: int
    R: int
    S: int
    M: int


CASES = [
    Case("distinct", rows=7, T=37, K=96, N=40, R=16, S=8, M=1),
    Case("identical", rows=5, T=70, K=33, N=96, R=8, S=4, M=2),
    Case("zipf", rows=7, T=23, K=48, N=17, R=32, S=6, M=2),
    Case("some_none", rows=6, T=45, K=64, N=72, R=4, S=5, M=2),
    Case("all_none", rows=4, T=19, K=40, N=24, R=8, S=3, M=2),
    Case("several", rows=5, T=29, K=80, N=56, R=12, S=4, M=3),
    Case("one_token", rows=3, T=1, K=96, N=96, R=32, S=3, M=1),
    Case("runs", rows=6, T=21, K=40, N=28, R=8, S=5, M=1),  # runs of rows sharing a slot, a row with none
    # The CPU reference's per-row path puts each row's scale on its smallest operand: K, N or T
    # ("distinct" above: T). And one adapter at one weight in every row: the GEMM's alpha.
    Case("distinct_k", rows=5, T=50, K=24, N=40, R=8, S=6, M=1),
    Case("distinct_n", rows=5, T=50, K=40, N=20, R=8, S=6, M=1),
    Case("shared", rows=4, T=33, K=40, N=28, R=8, S=3, M=1),
]


def _slots(case: Case, gen: torch.Generator) -> torch.Tensor:
    rows, M, S = case.rows, case.M, case.S
    slots = torch.full((rows, M), -1, dtype=torch.int32)
    if case.popularity.startswith("distinct"):
        slots[:, 0] = torch.randperm(S, generator=gen)[:rows].int()
    elif case.popularity in ("identical", "one_token", "shared"):
        slots[:, 0] = S - 1  # slot 0 unused: pairs with -1 must not read it
    elif case.popularity == "zipf":
        p = 1.0 / torch.arange(1, S + 1, dtype=torch.float64) ** 1.5
        slots[:] = torch.multinomial(p, rows * M, replacement=True, generator=gen).view(rows, M).int()
    elif case.popularity == "some_none":
        slots[:] = torch.randint(0, S, (rows, M), generator=gen).int()
        slots[torch.rand(rows, M, generator=gen) < 0.4] = -1
        slots[1] = -1  # at least one row with no adapter
        slots[2] = torch.tensor([-1, 3])  # a -1 before a used position
    elif case.popularity == "several":
        slots[:] = torch.randint(0, S, (rows, M), generator=gen).int()
        slots[0, :2] = 2  # the same adapter twice on one row
        slots[-1, 1] = -1
    elif case.popularity == "runs":
        slots[:, 0] = torch.tensor([3, 3, -1, 1, 1, 3])
    elif case.popularity != "all_none":
        raise ValueError(case.popularity)
    return slots


def _problem(case: Case, dtype, seed=0, poison_unused=True):
    """Inputs; pool slots no row uses hold NaN (free slots may hold anything) unless told not to."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.rows, case.T, case.K, generator=gen)
    A = torch.randn(case.S, case.K, case.R, generator=gen) / case.K**0.5
    B = torch.randn(case.S, case.R, case.N, generator=gen) / case.R**0.5
    y = torch.randn(case.rows, case.T, case.N, generator=gen)
    scales = 0.25 + 1.75 * torch.rand(case.rows, case.M, generator=gen)
    if case.popularity == "shared":
        scales.fill_(0.75)  # one user weight for every row
    slots = _slots(case, gen)
    if poison_unused:
        unused = torch.ones(case.S, dtype=torch.bool)
        unused[slots[slots >= 0].long()] = False
        A[unused], B[unused] = float("nan"), float("nan")
    return y.to(dtype), x.to(dtype), A.to(dtype), B.to(dtype), slots, scales


def _expected(y, x, A, B, slots, scales):
    """fp64 ground truth from the (low-precision) inputs, and PyTorch's own low-precision result."""
    exact = y.double() + lora_delta_ref(x.double(), A.double(), B.double(), slots, scales)
    lowp = y + lora_delta_ref(x, A, B, slots, scales, upcast=False) if y.dtype != torch.float32 else None
    return exact, lowp


def _loop_reference(x, A, B, slots, scales):
    """Per-row, per-adapter Python loop in fp64 (punica's sgmv_ref_impl style)."""
    out = torch.zeros(x.shape[0], x.shape[1], B.shape[2], dtype=torch.float64)
    for r in range(x.shape[0]):
        for m in range(slots.shape[1]):
            s = int(slots[r, m])
            if s >= 0:
                out[r] += float(scales[r, m]) * (x[r].double() @ A[s].double()) @ B[s].double()
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


def test_reference_matches_loop():
    for case in CASES:
        _, x, A, B, slots, scales = _problem(case, torch.float64, poison_unused=False)
        got = lora_delta_ref(x, A, B, slots, scales)
        torch.testing.assert_close(got, _loop_reference(x, A, B, slots, scales), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.popularity)
def test_lora_apply_matches_reference(case, dtype, backend):
    y0, x, A, B, slots, scales = _problem(case, dtype)
    unused = ~(slots >= 0).any(dim=1)
    # rows without an adapter hold -0.0 and NaN: they must come back bit for bit
    y0[unused, 0, 0] = -0.0
    y0[unused, -1, -1] = float("nan")
    exact, lowp = _expected(y0, x, A, B, slots, scales)
    y = y0.clone()
    out = lora_apply(y, x, A, B, slots, scales, backend=backend)
    assert out is y
    assert_close(y, exact, lowp=lowp, msg=f"{case} {dtype} {backend}")
    assert torch.equal(_bits(y[unused]), _bits(y0[unused]))
    if case.popularity == "all_none":
        assert torch.equal(_bits(y), _bits(y0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_delta_all_none_is_zero(backend):
    case = CASES[4]
    _, x, A, B, slots, scales = _problem(case, torch.float32)
    out = lora_delta(x, A, B, slots, scales, backend=backend)
    assert out.shape == (case.rows, case.T, case.N) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_views(backend):
    """y a slice of a fused projection's output, x a transposed view: strides are honoured."""
    case = Case("zipf", rows=4, T=21, K=40, N=24, R=8, S=5, M=2)
    _, x, A, B, slots, scales = _problem(case, torch.float32, seed=3)
    fused = torch.randn(case.rows, case.T, 3 * case.N)
    y = fused[:, :, case.N : 2 * case.N]
    x_t = x.transpose(1, 2).contiguous().transpose(1, 2)
    A_t = A.transpose(1, 2).contiguous().transpose(1, 2)
    before = fused.clone()
    exact, _ = _expected(y, x, A, B, slots, scales)
    lora_apply(y, x_t, A_t, B, slots, scales, backend=backend)
    assert_close(y, exact)
    assert torch.equal(fused[:, :, : case.N], before[:, :, : case.N])
    assert torch.equal(fused[:, :, 2 * case.N :], before[:, :, 2 * case.N :])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_ranks_across_buckets(dtype, backend):
    """Adapters of rank 3, 5 and 20 in two buckets (R=8, R=32), zero-padded; one launch per bucket."""
    gen = torch.Generator().manual_seed(7)
    rows, T, K, N, M = 5, 33, 48, 40, 2
    ranks = {0: 3, 1: 20, 2: 5}  # adapter id -> true rank, zero-padded to its bucket's R
    weights = {a: (torch.randn(K, r, generator=gen) / K**0.5, torch.randn(r, N, generator=gen) / r**0.5) for a, r in ranks.items()}
    # row -> adapters (id, scale); adapter 1 is in the R=32 bucket, 0 and 2 in the R=8 bucket
    plan = [[(0, 1.0), (1, 0.5)], [(1, 2.0)], [], [(2, 0.7), (0, 1.3)], [(2, 1.0), (1, 0.25)]]
    buckets = {8: [0, 2], 32: [1]}
    x = torch.randn(rows, T, K, generator=gen).to(dtype)
    y0 = torch.randn(rows, T, N, generator=gen).to(dtype)
    expected = y0.double().clone()
    for r, adapters in enumerate(plan):
        for a, s in adapters:
            A, B = (w.to(dtype).double() for w in weights[a])
            expected[r] += s * (x[r].double() @ A) @ B
    y, lowp = y0.clone(), y0.clone()
    for R, members in buckets.items():
        A_pool = torch.zeros(len(members), K, R)
        B_pool = torch.zeros(len(members), R, N)
        for slot, a in enumerate(members):
            A_pool[slot, :, : ranks[a]], B_pool[slot, : ranks[a]] = weights[a]
        slots = torch.full((rows, M), -1, dtype=torch.int32)
        scales = torch.zeros(rows, M)
        for r, adapters in enumerate(plan):
            for m, (a, s) in enumerate(adapters):
                if a in members:
                    slots[r, m], scales[r, m] = members.index(a), s
        A_pool, B_pool = A_pool.to(dtype), B_pool.to(dtype)
        lora_apply(y, x, A_pool, B_pool, slots, scales, backend=backend)
        lowp += lora_delta_ref(x, A_pool, B_pool, slots, scales, upcast=False)
    assert_close(y, expected, lowp=None if dtype == torch.float32 else lowp)
    assert torch.equal(y[2], y0[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_meta_serves_layers_with_different_pools(backend):
    """The metadata depends on slots only: two layers (different K, N, R) reuse one meta."""
    case = Case("several", rows=5, T=17, K=32, N=48, R=8, S=4, M=3)
    _, x, A, B, slots, scales = _problem(case, torch.float32, seed=1)
    meta = lora_meta(slots, case.S)
    layer2 = dataclasses.replace(case, K=72, N=24, R=16)
    _, x2, A2, B2, _, _ = _problem(layer2, torch.float32, seed=2, poison_unused=False)
    for args in [(x, A, B), (x2, A2, B2)]:
        y = torch.zeros(case.rows, case.T, args[2].shape[2])
        lora_apply(y, *args, slots, scales, meta=meta, backend=backend)
        assert_close(y, lora_delta_ref(*args, slots, scales))


# ----------------------------------------------------------------------------------------------
# Metadata
# ----------------------------------------------------------------------------------------------


def test_meta_running_example():
    slots = torch.tensor([[2, -1], [0, 2], [-1, -1]], dtype=torch.int32)
    meta = lora_meta(slots, 4)
    assert meta.pair_order.tolist() == [2, 0, 3, 1, 4, 5]
    assert meta.group_slot.tolist() == [0, 2, -1, -1]
    assert meta.group_start.tolist() == [0, 1, 3, 3, 3]
    assert meta.stats.tolist() == [2, 2, -1, 2, 2] and meta.stats.device.type == "cpu"
    assert all(t.dtype == torch.int32 for t in meta[:3])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.popularity)
def test_meta_groups_every_used_pair_once(case):
    slots = _slots(case, torch.Generator().manual_seed(0))
    meta = lora_meta(slots, case.S)
    flat = slots.reshape(-1)
    num_groups = int(meta.stats[0])
    assert num_groups == len(set(flat[flat >= 0].tolist()))
    seen = []
    for g in range(case.S):
        members = meta.pair_order[meta.group_start[g] : meta.group_start[g + 1]].tolist()
        if g >= num_groups:
            assert members == [] and int(meta.group_slot[g]) == -1
            continue
        assert members == sorted(members) and len(members) <= int(meta.stats[1])
        assert all(int(flat[p]) == int(meta.group_slot[g]) for p in members)
        seen += members
    assert sorted(seen) == sorted((flat >= 0).nonzero().flatten().tolist())


def test_meta_out_is_filled_in_place():
    a = torch.tensor([[1, -1], [0, 1]], dtype=torch.int32)
    b = torch.tensor([[-1, 2], [2, 2]], dtype=torch.int32)
    buffers = lora_meta(a, 3)
    ptrs = [t.data_ptr() for t in buffers]
    out = lora_meta(b, 3, out=buffers)
    assert [t.data_ptr() for t in out] == ptrs
    for got, want in zip(out, lora_meta(b, 3)):
        assert torch.equal(got, want)


def test_meta_rejects_bad_slots():
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        lora_meta(torch.tensor([[3]], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        lora_meta(torch.tensor([[-2]], dtype=torch.int32), 3)


def test_inputs_are_checked():
    _, x, A, B, slots, scales = _problem(CASES[0], torch.float32)
    y = torch.zeros(x.shape[0], x.shape[1], B.shape[2])
    with pytest.raises(ValueError, match="int32"):
        lora_apply(y, x, A, B, slots.long(), scales)
    with pytest.raises(ValueError, match="share a dtype"):
        lora_apply(y, x, A.half(), B, slots, scales)
    with pytest.raises(ValueError, match="pools"):
        lora_apply(y, x, A[:, :-1], B, slots, scales)
    with pytest.raises(ValueError, match="meta"):
        lora_apply(y, x, A, B, slots, scales, meta=lora_meta(slots[:-1], A.shape[0]))
    big_A, big_B = torch.zeros(A.shape[0], A.shape[1], 257), torch.zeros(B.shape[0], 257, B.shape[2])
    with pytest.raises(ValueError, match="No suitable kernel"):
        lora_apply(y, x, big_A, big_B, slots, scales, backend="triton")


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def _grads(fn, x, A, B, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    fn(*leaves).backward(dy)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[5]], ids=lambda c: c.popularity)
def test_lora_delta_gradients(case, dtype, backend):
    _, x, A, B, slots, scales = _problem(case, dtype, seed=11)
    dy = torch.randn(case.rows, case.T, case.N, generator=torch.Generator().manual_seed(12)).to(dtype)
    got = _grads(lambda *t: lora_delta(*t, slots, scales, backend=backend), x, A, B, dy)
    exact = _grads(lambda *t: lora_delta_ref(*t, slots, scales), x.double(), A.double(), B.double(), dy.double())
    # dA and dB reduce over every token of every row using the slot (hundreds of terms), where
    # fp32 rounding alone exceeds the elementwise fp32 tolerance: the 2x-PyTorch rule applies to
    # every dtype here, PyTorch's own computation in `dtype` being the low-precision reference.
    lowp = _grads(lambda *t: lora_delta_ref(*t, slots, scales, upcast=False), x, A, B, dy)
    unused = torch.ones(case.S, dtype=torch.bool)
    unused[slots[slots >= 0].long()] = False
    for name, g, e, lp in zip("x A B".split(), got, exact, lowp):
        assert g.dtype == dtype
        assert_close(g, e, lowp=lp, msg=f"d{name} {case} {dtype} {backend}")
        if name != "x":
            assert torch.equal(g[unused], torch.zeros_like(g[unused])), f"d{name} of unused slots"


def test_gradcheck_reference_float64():
    case = Case("several", rows=3, T=5, K=6, N=7, R=3, S=4, M=2)
    _, x, A, B, slots, scales = _problem(case, torch.float64, seed=5, poison_unused=False)
    slots[1, 1] = -1
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    # the registered backward formulas of the op, and the plain reference's autograd
    assert torch.autograd.gradcheck(lambda *t: lora_delta(*t, slots, scales, backend="reference"), leaves)
    assert torch.autograd.gradcheck(lambda *t: lora_delta_ref(*t, slots, scales), leaves)


# ----------------------------------------------------------------------------------------------
# Registration and compile
# ----------------------------------------------------------------------------------------------


class _OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_call_skips_the_op_and_equals_it(backend):
    """Outside compile and autograd, lora_apply runs the table's implementation without the custom
    op's dispatch (its per-call cost): the same bits as the op; with a tensor autograd must see,
    the op."""
    case = Case("some_none", rows=3, T=9, K=20, N=18, R=4, S=4, M=2)
    y, x, A, B, slots, scales = _problem(case, torch.float32, seed=3)
    meta = lora_meta(slots, case.S)
    by_op = y.clone()
    torch.ops.impasto.lora_apply_(by_op, x, A, B, slots, scales, *meta, backend)
    with torch.no_grad(), _OpsSeen() as seen:
        got = lora_apply(y.clone(), x, A, B, slots, scales, meta=meta, backend=backend)
    assert torch.equal(got, by_op)
    assert "impasto.lora_apply_" not in seen.names
    with _OpsSeen() as seen:
        lora_apply(y.clone(), x.clone().requires_grad_(), A, B, slots, scales, meta=meta, backend=backend)
    assert "impasto.lora_apply_" in seen.names


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    case = Case("some_none", rows=3, T=9, K=20, N=18, R=4, S=4, M=2)
    y, x, A, B, slots, scales = _problem(case, torch.float32, seed=2)
    meta = lora_meta(slots, case.S)
    ops = torch.ops.impasto
    torch.library.opcheck(ops.lora_apply_.default, (y, x, A, B, slots, scales, *meta, backend))
    leaves = [t.clone().requires_grad_() for t in (x, A, B)]
    torch.library.opcheck(ops.lora_delta.default, (*leaves, slots, scales, *meta, backend))
    dy = torch.randn_like(y)
    torch.library.opcheck(ops.lora_delta_backward.default, (dy, x, A, B, slots, scales, *meta, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_no_break_no_recompile(backend):
    """One step: meta built once, two layers; training through lora_delta, inference through
    lora_apply; fullgraph=True fails on any graph break, and a new slot table must not recompile."""
    import torch._dynamo

    case = Case("zipf", rows=4, T=13, K=24, N=20, R=8, S=5, M=2)
    _, x, A, B, _, scales = _problem(case, torch.float32, seed=4)

    def train_step(x, A, B, slots, scales):
        meta = lora_meta(slots, A.shape[0])
        h = torch.nn.functional.gelu(lora_delta(x, A, B, slots, scales, meta=meta))  # [rows, T, N]
        return lora_delta(h, B.transpose(1, 2), A.transpose(1, 2), slots, scales, meta=meta)

    def infer_step(y, x, A, B, slots, scales):
        y = y * 2
        lora_apply(y, x, A, B, slots, scales)
        return y + 1

    torch._dynamo.reset()
    train = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    infer = torch.compile(infer_step, fullgraph=True, backend="aot_eager")
    y = torch.randn(case.rows, case.T, case.N)
    with use_backend(backend):
        for seed in (0, 1):
            slots = _slots(case, torch.Generator().manual_seed(seed))
            leaves = [t.clone().requires_grad_() for t in (x, A, B)]
            ref_leaves = [t.clone().requires_grad_() for t in (x, A, B)]
            with torch._dynamo.config.patch(error_on_recompile=seed > 0):
                out = train(*leaves, slots, scales)
                inferred = infer(y, x, A, B, slots, scales)
            ref = train_step(*ref_leaves, slots, scales)
            assert_close(out, ref.detach())
            assert_close(inferred, infer_step(y, x, A, B, slots, scales))
            out.sum().backward()
            ref.sum().backward()
            for g, r in zip(leaves, ref_leaves):
                assert_close(g.grad, r.grad)
