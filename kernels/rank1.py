"""Perfusion's gated rank-one edit of a K or V projection, several concepts per row.

Basis: Tewel et al., "Key-Locked Rank One Editing for Text-to-Image Personalization"
(SIGGRAPH 2023, arXiv 2305.01644), eq. for h(e) and App. B (multi-concept), as read in
ChenDarYen's and lucidrains' implementations (research/methods.md §2.1, §2.4). The engine
(`impasto.adapters.rank1.row_tensors`) turns a request's concepts into the per-row tensors
below once per request; this op only evaluates, token-wise,

    h(e) = W e − Σ_j (u_jᵀ C⁻¹ e)·W u_j + Σ_j σ((s_j(e) − β_j)/τ_j)·o*_j,
    s_j(e) = i*_jᵀ C⁻¹ e / (i*_jᵀ C⁻¹ i*_j),

given base = W e (the frozen projection, computed by the caller), P_j = C⁻¹u_j, WU_j = W u_j,
G_j = C⁻¹i*_j / (i*_jᵀ C⁻¹ i*_j) and O_j = o*_j.

Layout: P and G are stacked into one [rows, 2M, D] operand and WU and O into one [rows, 2M, N]
operand ("columns" c in [0, M) remove, [M, 2M) gate), so the op is two skinny matmuls around an
elementwise gate: coef = e @ [P; G]ᵀ, c = [−coef_P, σ((coef_G − β)/τ)], out = base + c @ [WU; O].
The concept dimension is padded to MM >= 16 (tl.dot needs 16) with masked loads.

Precision: both dot products run in fp32 (operands upcast, "ieee" precision, no TF32) whatever
the input dtype, because s(e) is a ratio that fp16 ruins (methods.md §2.6); out is rounded once.

Legend: rows = sequences in the batch (one prompt's 77 encodings each), T = tokens per row,
D = encoder width (768 for SD 1.5), N = projection width h, M = concept slots per row (fixed),
MM = 2M padded to a power of two >= 16.

Launches per call: forward 1; backward 3 (coefficients + de, then two per-row reductions over
the tokens for the [P; G] and [WU; O] gradients).

Limits: untuned block sizes; the Triton path has only been run under the interpreter
(TRITON_INTERPRET=1) on CPU tensors. M <= 64 (one block covers the stacked columns).
"""

import os

import torch
import triton
import triton.language as tl

from . import dispatch

# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# Untuned. Under the interpreter every block iteration costs ~2-4 ms, so blocks are large there.
_GPU_BLOCKS = dict(BLOCK_T=32, BLOCK_D=64, BLOCK_N=64)
_INTERPRET_BLOCKS = dict(BLOCK_T=128, BLOCK_D=256, BLOCK_N=256)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (torch.float64, *_TRITON_DTYPES)
_MAX_TRITON_SLOTS = 64

# Set by tests: outputs and workspaces are filled with NaN instead of left uninitialized, so an
# element a kernel forgets to write shows up.
_POISON_WORKSPACE = False


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(t: torch.Tensor) -> dict:
    return _INTERPRET_BLOCKS if _interpreting(t) else _GPU_BLOCKS


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(n)))


def _empty(shape, dtype, device) -> torch.Tensor:
    if _POISON_WORKSPACE:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rank1_coef(
    E,  # pointer to the encodings, [rows, T, D]
    PG,  # pointer to the stacked [P; G], [rows, 2M, D]
    row,  # this program's row (int64)
    offs_t,  # [BLOCK_T] token ids
    offs_c,  # [MM] stacked column ids
    T,  # tokens per row
    D,  # encoder width
    M,  # concept slots per row
    stride_er, stride_et, stride_ed,  # strides of E
    stride_pr, stride_pc, stride_pd,  # strides of PG
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # encoder features per loop step
    MM: tl.constexpr,  # 2M padded
):
    # coef[t, c] = e[row, t] . PG[row, c] in fp32, over the whole of D.
    coef = tl.zeros((BLOCK_T, MM), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        e = tl.load(
            E + row * stride_er + offs_t[:, None] * stride_et + offs_d[None, :] * stride_ed,
            mask=(offs_t[:, None] < T) & (offs_d[None, :] < D),
            other=0.0,
        )
        pg = tl.load(
            PG + row * stride_pr + offs_c[None, :] * stride_pc + offs_d[:, None] * stride_pd,
            mask=(offs_c[None, :] < 2 * M) & (offs_d[:, None] < D),
            other=0.0,
        )  # [BLOCK_D, MM]
        coef = tl.dot(e.to(tl.float32), pg.to(tl.float32), coef, input_precision="ieee")
    return coef


@triton.jit
def _rank1_gate(
    coef,  # [BLOCK_T, MM] fp32 from _rank1_coef
    Beta,  # pointer to β, float32 [rows, M]
    Tau,  # pointer to τ, float32 [rows, M]
    row,  # this program's row (int64)
    offs_c,  # [MM] stacked column ids
    M,  # concept slots per row
    stride_br, stride_bm,  # strides of Beta
    stride_tr, stride_tm,  # strides of Tau
):
    # Returns (c, dc_dcoef): c = −coef on removal columns, σ((coef − β)/τ) on gate columns, and
    # the derivative of c by coef (−1, or σ(1 − σ)/τ). Padding columns carry coef = 0 -> c = −0.
    is_gate = (offs_c >= M) & (offs_c < 2 * M)
    m = tl.where(is_gate, offs_c - M, 0)
    beta = tl.load(Beta + row * stride_br + m * stride_bm, mask=is_gate, other=0.0)
    tau = tl.load(Tau + row * stride_tr + m * stride_tm, mask=is_gate, other=1.0)
    gate = tl.sigmoid((coef - beta[None, :]) / tau[None, :])
    c = tl.where(is_gate[None, :], gate, -coef)
    dc = tl.where(is_gate[None, :], gate * (1.0 - gate) / tau[None, :], -1.0)
    return c, dc


@triton.jit
def _rank1_fwd_kernel(
    Base,  # pointer to W e, [rows, T, N]
    E,  # pointer to the encodings, [rows, T, D]
    PG,  # pointer to [P; G], [rows, 2M, D]
    WO,  # pointer to [WU; O], [rows, 2M, N]
    Beta,  # pointer to β, float32 [rows, M]
    Tau,  # pointer to τ, float32 [rows, M]
    Out,  # pointer to the output, [rows, T, N]; written in full
    T,  # tokens per row
    D,  # encoder width
    N,  # projection width
    M,  # concept slots per row
    stride_br0, stride_bt0, stride_bn0,  # strides of Base
    stride_er, stride_et, stride_ed,  # strides of E
    stride_pr, stride_pc, stride_pd,  # strides of PG
    stride_wr, stride_wc, stride_wn,  # strides of WO
    stride_br, stride_bm,  # strides of Beta
    stride_tr, stride_tm,  # strides of Tau
    stride_or, stride_ot, stride_on,  # strides of Out
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # encoder features per loop step
    BLOCK_N: tl.constexpr,  # output features per program
    MM: tl.constexpr,  # 2M padded to a power of two >= 16
):
    # Program (tb, row, nb) owns Out[row, tb-block, nb-block]; the skinny coefficient product
    # (BLOCK_T x D x MM) is recomputed per N block rather than staged through memory.
    pid_t = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, MM)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    coef = _rank1_coef(E, PG, row, offs_t, offs_c, T, D, M, stride_er, stride_et, stride_ed,
                       stride_pr, stride_pc, stride_pd, BLOCK_T, BLOCK_D, MM)
    c, _ = _rank1_gate(coef, Beta, Tau, row, offs_c, M, stride_br, stride_bm, stride_tr, stride_tm)
    wo = tl.load(
        WO + row * stride_wr + offs_c[:, None] * stride_wc + offs_n[None, :] * stride_wn,
        mask=(offs_c[:, None] < 2 * M) & (offs_n[None, :] < N),
        other=0.0,
    )  # [MM, BLOCK_N]
    mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    base = tl.load(
        Base + row * stride_br0 + offs_t[:, None] * stride_bt0 + offs_n[None, :] * stride_bn0,
        mask=mask,
        other=0.0,
    )
    out = tl.dot(c, wo.to(tl.float32), base.to(tl.float32), input_precision="ieee")
    tl.store(
        Out + row * stride_or + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on,
        out.to(Out.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _rank1_bwd_kernel(
    DY,  # pointer to the output gradient, [rows, T, N]
    E,  # pointer to the encodings, [rows, T, D]
    PG,  # pointer to [P; G], [rows, 2M, D]
    WO,  # pointer to [WU; O], [rows, 2M, N]
    Beta,  # pointer to β, float32 [rows, M]
    Tau,  # pointer to τ, float32 [rows, M]
    DE,  # pointer to the encoding gradient, [rows, T, D]; written in full
    DCoef,  # pointer to dL/dcoef, fp32 [rows, T, MM]; written by the nb == 0 programs
    C,  # pointer to c (the transformed coefficients), fp32 [rows, T, MM]; same
    T,  # tokens per row
    D,  # encoder width
    N,  # projection width
    M,  # concept slots per row
    stride_yr, stride_yt, stride_yn,  # strides of DY
    stride_er, stride_et, stride_ed,  # strides of E
    stride_pr, stride_pc, stride_pd,  # strides of PG
    stride_wr, stride_wc, stride_wn,  # strides of WO
    stride_br, stride_bm,  # strides of Beta
    stride_tr, stride_tm,  # strides of Tau
    stride_dr, stride_dt, stride_dd,  # strides of DE
    stride_kr, stride_kt, stride_kc,  # strides of DCoef and C (same shape, contiguous)
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_D: tl.constexpr,  # encoder features per loop step / per program
    BLOCK_N: tl.constexpr,  # output features per loop step
    MM: tl.constexpr,  # 2M padded to a power of two >= 16
):
    # Program (tb, row, db): dcoef = (dy @ [WU; O]ᵀ) * dc/dcoef over the whole of N, then
    # DE[row, tb-block, db-block] = dcoef @ [P; G][:, db-block].
    pid_t = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, MM)
    coef = _rank1_coef(E, PG, row, offs_t, offs_c, T, D, M, stride_er, stride_et, stride_ed,
                       stride_pr, stride_pc, stride_pd, BLOCK_T, BLOCK_D, MM)
    c, dc = _rank1_gate(coef, Beta, Tau, row, offs_c, M, stride_br, stride_bm, stride_tr, stride_tm)
    dcp = tl.zeros((BLOCK_T, MM), dtype=tl.float32)  # dL/dc = dy @ [WU; O]ᵀ
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            DY + row * stride_yr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
            mask=(offs_t[:, None] < T) & (offs_n[None, :] < N),
            other=0.0,
        )
        wo = tl.load(
            WO + row * stride_wr + offs_c[None, :] * stride_wc + offs_n[:, None] * stride_wn,
            mask=(offs_c[None, :] < 2 * M) & (offs_n[:, None] < N),
            other=0.0,
        )  # [BLOCK_N, MM]
        dcp = tl.dot(dy.to(tl.float32), wo.to(tl.float32), dcp, input_precision="ieee")
    dcoef = dcp * dc
    if pid_d == 0:
        k_off = row * stride_kr + offs_t[:, None] * stride_kt + offs_c[None, :] * stride_kc
        k_mask = (offs_t[:, None] < T) & (offs_c[None, :] < MM)
        tl.store(DCoef + k_off, dcoef, mask=k_mask)
        tl.store(C + k_off, c, mask=k_mask)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    pg = tl.load(
        PG + row * stride_pr + offs_c[:, None] * stride_pc + offs_d[None, :] * stride_pd,
        mask=(offs_c[:, None] < 2 * M) & (offs_d[None, :] < D),
        other=0.0,
    )  # [MM, BLOCK_D]
    de = tl.dot(dcoef, pg.to(tl.float32), input_precision="ieee")
    tl.store(
        DE + row * stride_dr + offs_t[:, None] * stride_dt + offs_d[None, :] * stride_dd,
        de.to(DE.dtype.element_ty),
        mask=(offs_t[:, None] < T) & (offs_d[None, :] < D),
    )


@triton.jit
def _rank1_wgrad_kernel(
    L,  # pointer to the per-token coefficients, fp32 [rows, T, MM] (DCoef or C)
    R,  # pointer to the per-token features, [rows, T, X] (E or DY)
    DW,  # pointer to the stacked gradient, [rows, 2M, X]; written in full
    T,  # tokens per row
    X,  # feature width (D or N)
    M,  # concept slots per row
    stride_lr, stride_lt, stride_lc,  # strides of L
    stride_rr, stride_rt, stride_rx,  # strides of R
    stride_wr, stride_wc, stride_wx,  # strides of DW
    BLOCK_T: tl.constexpr,  # tokens per loop step
    BLOCK_X: tl.constexpr,  # features per program
    MM: tl.constexpr,  # 2M padded to a power of two >= 16
):
    # Program (xb, row): DW[row, :, xb-block] = Σ_t L[row, t]ᵀ R[row, t, xb-block]; one program
    # per tile, no atomics.
    pid_x = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, MM)
    offs_x = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    acc = tl.zeros((MM, BLOCK_X), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        left = tl.load(
            L + row * stride_lr + offs_t[None, :] * stride_lt + offs_c[:, None] * stride_lc,
            mask=offs_t[None, :] < T,
            other=0.0,
        )  # [MM, BLOCK_T]
        right = tl.load(
            R + row * stride_rr + offs_t[:, None] * stride_rt + offs_x[None, :] * stride_rx,
            mask=(offs_t[:, None] < T) & (offs_x[None, :] < X),
            other=0.0,
        )
        acc = tl.dot(left, right.to(tl.float32), acc, input_precision="ieee")
    tl.store(
        DW + row * stride_wr + offs_c[:, None] * stride_wc + offs_x[None, :] * stride_wx,
        acc.to(DW.dtype.element_ty),
        mask=(offs_c[:, None] < 2 * M) & (offs_x[None, :] < X),
    )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def _mm(M: int) -> int:
    if M > _MAX_TRITON_SLOTS:
        raise ValueError(f"No suitable kernel: M={M} concept slots > {_MAX_TRITON_SLOTS} (one block covers 2M)")
    return max(16, triton.next_power_of_2(2 * M))


def _stack(P, WU, G, O):
    return torch.cat([P, G], dim=1), torch.cat([WU, O], dim=1)  # [rows, 2M, D], [rows, 2M, N]


def _rank1_fwd(base, e, PG, WO, beta, tau, M: int) -> torch.Tensor:
    rows, T, N = base.shape
    D = e.shape[2]
    out = _empty(base.shape, base.dtype, base.device)
    if rows == 0 or T == 0 or N == 0:
        return out
    blocks = _blocks(e)
    block_t = _block(T, blocks["BLOCK_T"])
    block_n = _block(N, blocks["BLOCK_N"])
    grid = (triton.cdiv(T, block_t), rows, triton.cdiv(N, block_n))
    _rank1_fwd_kernel[grid](
        base, e, PG, WO, beta, tau, out,
        T, D, N, M,
        *base.stride(), *e.stride(), *PG.stride(), *WO.stride(), *beta.stride(), *tau.stride(), *out.stride(),
        BLOCK_T=block_t,
        BLOCK_D=_block(D, blocks["BLOCK_D"]),
        BLOCK_N=block_n,
        MM=_mm(M),
    )
    return out


def _rank1_bwd(dy, e, PG, WO, beta, tau, M: int):
    """(de [rows, T, D], dPG [rows, 2M, D], dWO [rows, 2M, N]) in the inputs' dtypes."""
    rows, T, N = dy.shape
    D = e.shape[2]
    MM = _mm(M)
    de = _empty(e.shape, e.dtype, e.device)
    dPG = _empty(PG.shape, PG.dtype, PG.device)
    dWO = _empty(WO.shape, WO.dtype, WO.device)
    if rows * T == 0:
        return de.zero_(), dPG.zero_(), dWO.zero_()
    dcoef = _empty((rows, T, MM), torch.float32, e.device)
    c = _empty((rows, T, MM), torch.float32, e.device)
    blocks = _blocks(e)
    block_t = _block(T, blocks["BLOCK_T"])
    block_d = _block(D, blocks["BLOCK_D"])
    block_n = _block(N, blocks["BLOCK_N"])
    grid = (triton.cdiv(T, block_t), rows, triton.cdiv(D, block_d))
    _rank1_bwd_kernel[grid](
        dy, e, PG, WO, beta, tau, de, dcoef, c,
        T, D, N, M,
        *dy.stride(), *e.stride(), *PG.stride(), *WO.stride(), *beta.stride(), *tau.stride(), *de.stride(),
        *dcoef.stride(),
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        MM=MM,
    )
    for left, right, dW, block_x in ((dcoef, e, dPG, block_d), (c, dy, dWO, block_n)):
        X = right.shape[2]
        _rank1_wgrad_kernel[(triton.cdiv(X, block_x), rows)](
            left, right, dW,
            T, X, M,
            *left.stride(), *right.stride(), *dW.stride(),
            BLOCK_T=block_t,
            BLOCK_X=block_x,
            MM=MM,
        )
    return de, dPG, dWO


# ----------------------------------------------------------------------------------------------
# Backends (reference = plain PyTorch, triton = the kernels above)
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


def _ref_forward_parts(e, P, WU, G, O, beta, tau, cdt):
    """coef [rows, T, 2M], c [rows, T, 2M], stacked [WU; O] [rows, 2M, N], all in cdt."""
    M = P.shape[1]
    PG, WO = _stack(P.to(cdt), WU.to(cdt), G.to(cdt), O.to(cdt))
    coef = torch.einsum("rtd,rcd->rtc", e.to(cdt), PG)
    a, s = coef[..., :M], coef[..., M:]
    gate = torch.sigmoid((s - beta.to(cdt)[:, None, :]) / tau.to(cdt)[:, None, :])
    return PG, WO, coef, torch.cat([-a, gate], dim=-1)


@dispatch.register("rank1_edit", "reference", dtypes=_REFERENCE_DTYPES)
def _rank1_edit_reference(base, e, P, WU, G, O, beta, tau) -> torch.Tensor:
    return rank1_edit_ref(base, e, P, WU, G, O, beta, tau).to(base.dtype)


@dispatch.register("rank1_edit", "triton", dtypes=_TRITON_DTYPES)
def _rank1_edit_triton(base, e, P, WU, G, O, beta, tau) -> torch.Tensor:
    PG, WO = _stack(P, WU, G, O)
    return _rank1_fwd(base, e, PG, WO, beta, tau, P.shape[1])


@dispatch.register("rank1_edit_backward", "reference", dtypes=_REFERENCE_DTYPES)
def _rank1_edit_backward_reference(dy, e, P, WU, G, O, beta, tau):
    M = P.shape[1]
    cdt = _compute_dtype(e.dtype, upcast=True)
    PG, WO, coef, c = _ref_forward_parts(e, P, WU, G, O, beta, tau, cdt)
    gate = c[..., M:]
    dc = torch.cat([torch.full_like(gate, -1.0), gate * (1 - gate) / tau.to(cdt)[:, None, :]], dim=-1)
    dyc = dy.to(cdt)
    dcoef = torch.einsum("rtn,rcn->rtc", dyc, WO) * dc  # [rows, T, 2M]
    de = torch.einsum("rtc,rcd->rtd", dcoef, PG)
    dPG = torch.einsum("rtc,rtd->rcd", dcoef, e.to(cdt))
    dWO = torch.einsum("rtc,rtn->rcn", c, dyc)
    # copy=True: the four gradients are slices of two tensors and must not alias each other.
    return (
        de.to(e.dtype),
        dPG[:, :M].to(P.dtype, copy=True),
        dWO[:, :M].to(WU.dtype, copy=True),
        dPG[:, M:].to(G.dtype, copy=True),
        dWO[:, M:].to(O.dtype, copy=True),
    )


@dispatch.register("rank1_edit_backward", "triton", dtypes=_TRITON_DTYPES)
def _rank1_edit_backward_triton(dy, e, P, WU, G, O, beta, tau):
    M = P.shape[1]
    PG, WO = _stack(P, WU, G, O)
    de, dPG, dWO = _rank1_bwd(dy, e, PG, WO, beta, tau, M)
    return de, dPG[:, :M].clone(), dWO[:, :M].clone(), dPG[:, M:].clone(), dWO[:, M:].clone()


# ----------------------------------------------------------------------------------------------
# Registration (torch.library, namespace "impasto")
# ----------------------------------------------------------------------------------------------
# custom_op rather than triton_op + wrap_triton, as in lora.py: the backend is picked at run time
# and wrap_triton cannot trace launches on fake tensors under TRITON_INTERPRET=1.
# The backend string "" means: resolve through dispatch (argument > context > env > default).


@torch.library.custom_op("impasto::rank1_edit", mutates_args=())
def _rank1_edit_op(
    base: torch.Tensor,
    e: torch.Tensor,
    P: torch.Tensor,
    WU: torch.Tensor,
    G: torch.Tensor,
    O: torch.Tensor,
    beta: torch.Tensor,
    tau: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return dispatch.resolve("rank1_edit", e.device, e.dtype, backend)(base, e, P, WU, G, O, beta, tau)


@_rank1_edit_op.register_fake
def _(base, e, P, WU, G, O, beta, tau, backend):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.custom_op("impasto::rank1_edit_backward", mutates_args=())
def _rank1_edit_backward_op(
    dy: torch.Tensor,
    e: torch.Tensor,
    P: torch.Tensor,
    WU: torch.Tensor,
    G: torch.Tensor,
    O: torch.Tensor,
    beta: torch.Tensor,
    tau: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = dispatch.resolve("rank1_edit_backward", e.device, e.dtype, backend)
    return impl(dy, e, P, WU, G, O, beta, tau)


@_rank1_edit_backward_op.register_fake
def _(dy, e, P, WU, G, O, beta, tau, backend):
    c = torch.contiguous_format
    return tuple(torch.empty_like(t, memory_format=c) for t in (e, P, WU, G, O))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:8])
    ctx.backend = inputs[8]


def _backward(ctx, dy):
    e, P, WU, G, O, beta, tau = ctx.saved_tensors
    de, dP, dWU, dG, dO = torch.ops.impasto.rank1_edit_backward(dy, e, P, WU, G, O, beta, tau, ctx.backend)
    return dy, de, dP, dWU, dG, dO, None, None, None


torch.library.register_autograd("impasto::rank1_edit", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _check(base, e, P, WU, G, O, beta, tau) -> None:
    if base.dim() != 3 or e.dim() != 3 or base.shape[:2] != e.shape[:2]:
        raise ValueError(
            f"base must be [rows, T, N] and e [rows, T, D], got {tuple(base.shape)} and {tuple(e.shape)}"
        )
    rows, T, N = base.shape
    D = e.shape[2]
    if P.dim() != 3 or P.shape[0] != rows or P.shape[2] != D:
        raise ValueError(f"P must be [rows={rows}, M, D={D}], got {tuple(P.shape)}")
    M = P.shape[1]
    for name, t, shape in (("G", G, (rows, M, D)), ("WU", WU, (rows, M, N)), ("O", O, (rows, M, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {shape} (rows, M, {'D' if name == 'G' else 'N'}), got {tuple(t.shape)}")
    for name, t in (("beta", beta), ("tau", tau)):
        if tuple(t.shape) != (rows, M) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 {(rows, M)}, got {t.dtype} {tuple(t.shape)}")
    if base.dtype != e.dtype:
        raise ValueError(f"base and e must share a dtype, got {base.dtype} and {e.dtype}")
    wdt = {P.dtype, WU.dtype, G.dtype, O.dtype}
    if len(wdt) != 1 or next(iter(wdt)) not in (e.dtype, torch.float32):
        raise ValueError(
            f"P, WU, G, O must share one dtype, e's ({e.dtype}) or float32; got {P.dtype}, {WU.dtype}, {G.dtype}, {O.dtype}"
        )


def rank1_edit(base, e, P, WU, G, O, beta, tau, *, backend: str | None = None) -> torch.Tensor:
    """Perfusion's gated rank-one edit of one K or V projection, M concept slots per row.

    Semantics (M concept slots per row; one row = one prompt's encodings):
      for r in range(rows), t in range(T):
          a[m] = P[r, m] . e[r, t]                           # u_mᵀ C⁻¹ e, fp32
          s[m] = G[r, m] . e[r, t]                           # s_m(e), fp32
          out[r, t] = base[r, t] − Σ_m a[m] · WU[r, m]
                                 + Σ_m σ((s[m] − beta[r, m]) / tau[r, m]) · O[r, m]
      i.e. W e_⊥ + Σ gate·o* with base = W e (methods.md §2.1, §2.4). Both dot products and the
      sum are fp32 (fp64 for fp64 inputs); out is rounded once to base's dtype.
      Unused slots: zero P, WU and O (and any finite G, tau > 0) contribute exactly zero; a row
      whose slots are all unused returns base's values (up to the sign of zero).

    Args:
      base: Shape: `[rows, T, N]`. W e, the frozen projection of e (fp32, fp16, bf16; fp64 on
        the reference backend).
      e: Shape: `[rows, T, D]`. Text encodings, base's dtype.
      P: Shape: `[rows, M, D]`. C⁻¹ u_m (the C⁻¹-orthonormal basis of the concepts' i*).
      WU: Shape: `[rows, M, N]`. W u_m.
      G: Shape: `[rows, M, D]`. C⁻¹ i*_m / (i*_mᵀ C⁻¹ i*_m).
      O: Shape: `[rows, M, N]`. o*_m (locked W_K e_super for K, learned for V).
        P, WU, G, O share one dtype: e's or float32.
      beta, tau: Shape: `[rows, M]`, float32. Gate bias and temperature per concept slot.
      backend: "reference", "triton" or "native"; None defers to `dispatch`.

    Gradients: base (identity), e, P, WU, G and O (each in its dtype); none for beta and tau.
      de[r, t] = Σ_m −(dy·WU[r, m]) P[r, m] + (dy·O[r, m]) σ'/tau[r, m] · G[r, m]
      dO[r, m] = Σ_t σ_m(t) dy[r, t]; dWU[r, m] = −Σ_t a_m(t) dy[r, t]; dP, dG likewise over e.
      (Perfusion trains o*_V and, through e, the token embedding; i*, C⁻¹ and W are fixed, so the
      engine passes P, WU, G without requires_grad and their gradients are never formed.)

    Returns: Shape: `[rows, T, N]`, base's dtype, a new tensor.
    """
    _check(base, e, P, WU, G, O, beta, tau)
    return torch.ops.impasto.rank1_edit(base, e, P, WU, G, O, beta, tau, backend or "")


def rank1_edit_ref(base, e, P, WU, G, O, beta, tau, *, upcast: bool = True) -> torch.Tensor:
    """Plain-PyTorch `rank1_edit` (vectorized einsums), differentiable by ordinary autograd.

    Semantics: as `rank1_edit`. Computes in fp32 (fp64 for fp64 inputs) and returns that dtype;
    with upcast=False computes and returns in e's dtype (the low-precision reference of
    flash-attention's "2x the PyTorch error" rule).
    """
    cdt = _compute_dtype(e.dtype, upcast)
    _, WO, _, c = _ref_forward_parts(e, P, WU, G, O, beta, tau, cdt)
    return base.to(cdt) + torch.einsum("rtc,rcn->rtn", c, WO)
