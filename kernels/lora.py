"""Multi-adapter LoRA for batched diffusion: every row (one image's tokens) carries up to M adapters.

Based on Punica's SGMV (shrink to rank r, then expand) and vLLM's Triton LoRA ops and
`LoRAKernelMeta` (vllm/lora/ops/triton_ops/). Differences, and why:
  * A row is a whole sequence (thousands of latent tokens), so pairs (row, m) are grouped by
    adapter slot once per step (`lora_meta`) and every layer reuses that grouping.
  * The rank-r intermediate stays fp32 end to end (vllm#2893: Punica's fp16 intermediate lost
    accuracy); the expand multiplies it against the weights upcast to fp32.
  * The expand is row-owned: one program sums the M adapters of a row, so several adapters on
    one row need no atomics and results are deterministic. Shrink and the weight gradients are
    grouped by slot (each slot's gradient is one program's reduction, again without atomics).
Limits: untuned block sizes (no per-GPU configs yet); the Triton path has only been run under
the interpreter (TRITON_INTERPRET=1) on CPU tensors.

Legend: rows = sequences in the batch, T = tokens per row, K = in features, N = out features,
R = rank bucket (adapters zero-padded to R), S = pool slots, M = adapters per row (fixed),
P = rows * M adapter pairs, pair p = row * M + m.

Launches per call: forward 2 (shrink, expand); backward 5 (shrink dy with B^T, expand with A^T
into dx, shrink x with A, two grouped weight-gradient reductions).
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import dispatch

# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# Block sizes are untuned. The interpreter pays ~2-4 ms per block-level iteration whatever the
# block size, so under it blocks are as large as the test shapes need.
_GPU_BLOCKS = dict(BLOCK_T=64, BLOCK_K=64, BLOCK_N=64)
_INTERPRET_BLOCKS = dict(BLOCK_T=128, BLOCK_K=128, BLOCK_N=128)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (torch.float64, *_TRITON_DTYPES)

# Set by tests: workspaces that the kernels must fully write before reading are filled with NaN
# instead of left uninitialized, so a missed write shows up.
_POISON_WORKSPACE = False


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(t: torch.Tensor) -> dict:
    return _INTERPRET_BLOCKS if _interpreting(t) else _GPU_BLOCKS


# The rank is covered by one block (BLOCK_R); larger buckets need a rank loop.
_MAX_TRITON_RANK = 256


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dimension >= 16.
    return max(16, min(cap, triton.next_power_of_2(n)))


def _dot_flags(t: torch.Tensor) -> dict:
    # The interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584), so
    # operands are upcast to fp32 there. fp32 inputs always use IEEE fp32 (no TF32 rounding);
    # fp16/bf16 shrink on a GPU uses the native 16-bit dot with fp32 accumulation.
    upcast = _interpreting(t) or t.dtype == torch.float32
    return dict(UPCAST=upcast, PRECISION="ieee" if t.dtype == torch.float32 else "tf32")


def _workspace(shape, device) -> torch.Tensor:
    if _POISON_WORKSPACE:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lora_shrink_kernel(
    X,  # pointer to the input, [rows, T, K]
    W,  # pointer to the down pool, [S, K, R] (B^T in the backward)
    Tmp,  # pointer to the fp32 intermediate, [P, T, R]; written for active pairs only
    Scales,  # pointer to the per-pair scales, float32 [rows, M]
    PairOrder,  # pointer to pair ids sorted by slot, int32 [P]
    GroupSlot,  # pointer to each active group's slot, int32 [S]
    GroupStart,  # pointer to each group's first index into PairOrder, int32 [S + 1]
    T,  # tokens per row
    K,  # input features
    R,  # rank bucket
    stride_xr, stride_xt, stride_xk,  # strides of X
    stride_ws, stride_wk, stride_wr,  # strides of W
    stride_tp, stride_tt, stride_tr,  # strides of Tmp
    stride_sr, stride_sm,  # strides of Scales
    M: tl.constexpr,  # adapters per row
    BLOCK_T: tl.constexpr,  # gathered tokens per program
    BLOCK_K: tl.constexpr,  # input features per loop step
    BLOCK_R: tl.constexpr,  # covers R in one block
    UPCAST: tl.constexpr,  # cast operands to fp32 before tl.dot
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
):
    # Program (tb, g): tokens [tb*BLOCK_T, (tb+1)*BLOCK_T) of group g's gathered token list,
    # which concatenates the T tokens of each of the group's pairs; tiles cross row boundaries.
    pid_t = tl.program_id(0)
    group = tl.program_id(1)
    slot = tl.load(GroupSlot + group).to(tl.int64)
    start = tl.load(GroupStart + group)
    num_tokens = (tl.load(GroupStart + group + 1) - start) * T
    if pid_t * BLOCK_T >= num_tokens:
        return
    idx = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = idx < num_tokens
    pair = tl.load(PairOrder + start + idx // T, mask=valid, other=0).to(tl.int64)
    row = pair // M
    tok = idx % T
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            X + row[:, None] * stride_xr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=valid[:, None] & (offs_k[None, :] < K),
            other=0.0,
        )
        w = tl.load(
            W + slot * stride_ws + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
            mask=(offs_k[:, None] < K) & (offs_r[None, :] < R),
            other=0.0,
        )
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(x, w, acc)
    scale = tl.load(Scales + row * stride_sr + (pair % M) * stride_sm, mask=valid, other=0.0)
    acc = acc * scale[:, None]
    tl.store(
        Tmp + pair[:, None] * stride_tp + tok[:, None] * stride_tt + offs_r[None, :] * stride_tr,
        acc,
        mask=valid[:, None] & (offs_r[None, :] < R),
    )


@triton.jit
def _lora_expand_kernel(
    Tmp,  # pointer to the fp32 intermediate, [P, T, R]
    W,  # pointer to the up pool, [S, R, N] (A^T in the backward)
    Y,  # pointer to the output, [rows, T, N]; updated in place
    Slots,  # pointer to the slot table, int32 [rows, M]; -1 = none
    T,  # tokens per row
    N,  # output features
    R,  # rank bucket
    stride_tp, stride_tt, stride_tr,  # strides of Tmp
    stride_ws, stride_wr, stride_wn,  # strides of W
    stride_yr, stride_yt, stride_yn,  # strides of Y
    stride_sr, stride_sm,  # strides of Slots
    M: tl.constexpr,  # adapters per row
    M_POW2: tl.constexpr,  # M rounded up to a power of two
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_R: tl.constexpr,  # covers R in one block
    PRECISION: tl.constexpr,  # tl.dot input_precision (operands are fp32)
):
    # Program (tb, row, nb) owns Y[row, tb-block, nb-block] and sums the row's M adapters, so
    # it is the only writer of its tile: no atomics, one read-modify-write, one rounding.
    pid_t = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_n = tl.program_id(2)
    offs_m = tl.arange(0, M_POW2)
    row_slots = tl.load(Slots + row * stride_sr + offs_m * stride_sm, mask=offs_m < M, other=-1)
    if tl.max(row_slots, axis=0) < 0:
        return
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for m in tl.static_range(M):
        slot = tl.load(Slots + row * stride_sr + m * stride_sm).to(tl.int64)
        if slot >= 0:
            tmp = tl.load(
                Tmp + (row * M + m) * stride_tp + offs_t[:, None] * stride_tt + offs_r[None, :] * stride_tr,
                mask=(offs_t[:, None] < T) & (offs_r[None, :] < R),
                other=0.0,
            )
            w = tl.load(
                W + slot * stride_ws + offs_r[:, None] * stride_wr + offs_n[None, :] * stride_wn,
                mask=(offs_r[:, None] < R) & (offs_n[None, :] < N),
                other=0.0,
            )
            acc = tl.dot(tmp, w.to(tl.float32), acc, input_precision=PRECISION)
    y_ptrs = Y + row * stride_yr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn
    y_mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(Y.dtype.element_ty), mask=y_mask)


@triton.jit
def _lora_grad_weight_kernel(
    L,  # pointer to the left operand, [*, T, KD], indexed by pair // L_DIV
    Rt,  # pointer to the right operand, [*, T, ND], indexed by pair // R_DIV
    DW,  # pointer to the weight gradient, [S, KD, ND]; only active slots are written
    PairOrder,  # pointer to pair ids sorted by slot, int32 [P]
    GroupSlot,  # pointer to each active group's slot, int32 [S]
    GroupStart,  # pointer to each group's first index into PairOrder, int32 [S + 1]
    T,  # tokens per row
    KD,  # rows of the gradient
    ND,  # columns of the gradient
    stride_lp, stride_lt, stride_lk,  # strides of L
    stride_rp, stride_rt, stride_rn,  # strides of Rt
    stride_ws, stride_wk, stride_wn,  # strides of DW
    L_DIV: tl.constexpr,  # M when L is per row (x, dy), 1 when per pair (the intermediate)
    R_DIV: tl.constexpr,  # same for Rt
    BLOCK_T: tl.constexpr,  # gathered tokens per loop step
    BLOCK_KD: tl.constexpr,  # gradient rows per program
    BLOCK_ND: tl.constexpr,  # gradient columns per program
    PRECISION: tl.constexpr,  # tl.dot input_precision (operands are fp32)
):
    # Program (g, kb, nb): DW[slot_g][kb, nb] = sum over the group's gathered tokens of
    # L[token, kb]^T @ Rt[token, nb]. One program per tile and slot: no atomics.
    group = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(GroupSlot + group).to(tl.int64)
    start = tl.load(GroupStart + group)
    num_tokens = (tl.load(GroupStart + group + 1) - start) * T
    offs_k = pid_k * BLOCK_KD + tl.arange(0, BLOCK_KD)
    offs_n = pid_n * BLOCK_ND + tl.arange(0, BLOCK_ND)
    acc = tl.zeros((BLOCK_KD, BLOCK_ND), dtype=tl.float32)
    for i0 in range(0, num_tokens, BLOCK_T):
        idx = i0 + tl.arange(0, BLOCK_T)
        valid = idx < num_tokens
        pair = tl.load(PairOrder + start + idx // T, mask=valid, other=0).to(tl.int64)
        tok = idx % T
        left = tl.load(
            L + (pair // L_DIV)[:, None] * stride_lp + tok[:, None] * stride_lt + offs_k[None, :] * stride_lk,
            mask=valid[:, None] & (offs_k[None, :] < KD),
            other=0.0,
        )
        right = tl.load(
            Rt + (pair // R_DIV)[:, None] * stride_rp + tok[:, None] * stride_rt + offs_n[None, :] * stride_rn,
            mask=valid[:, None] & (offs_n[None, :] < ND),
            other=0.0,
        )
        acc = tl.dot(tl.trans(left.to(tl.float32)), right.to(tl.float32), acc, input_precision=PRECISION)
    tl.store(
        DW + slot * stride_ws + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
        acc.to(DW.dtype.element_ty),
        mask=(offs_k[:, None] < KD) & (offs_n[None, :] < ND),
    )


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class LoraMeta(NamedTuple):
    """Slot grouping of one step's slot table, built by `lora_meta`, shared by every layer.

    Running example: rows = 3, M = 2, S = 4, slots = [[2, -1], [0, 2], [-1, -1]]
    (pairs p = row*M + m: p0 -> slot 2, p2 -> slot 0, p3 -> slot 2; p1, p4, p5 unused).
    """

    pair_order: torch.Tensor  # int32 [P]: pairs sorted by slot, stable, unused last: [2, 0, 3, 1, 4, 5]
    group_slot: torch.Tensor  # int32 [S]: slot of active group g, -1 past the last: [0, 2, -1, -1]
    group_start: torch.Tensor  # int32 [S + 1]: group g is pair_order[start[g]:start[g+1]]: [0, 1, 3, 3, 3]
    # int64 [5] on CPU: active groups, most pairs in a group, min slot, max slot, rows with an
    # adapter: [2, 2, -1, 2, 2]
    stats: torch.Tensor


def _check_meta(meta: LoraMeta, slots: torch.Tensor, A_pool: torch.Tensor) -> None:
    if meta.pair_order.numel() != slots.numel():
        raise ValueError(f"meta was built for {meta.pair_order.numel()} pairs, slots has {slots.numel()}")
    if meta.group_slot.numel() > A_pool.shape[0]:
        raise ValueError(f"meta allows {meta.group_slot.numel()} slots, the pool has {A_pool.shape[0]}")
    if meta.stats.device.type != "cpu":
        raise ValueError("meta.stats must be a CPU tensor")


def _check_rank(R: int) -> None:
    if R > _MAX_TRITON_RANK:
        raise ValueError(f"No suitable kernel: rank bucket R={R} > {_MAX_TRITON_RANK} (one block covers the rank)")


def _lora_shrink(x, W, scales, meta: LoraMeta, M: int) -> torch.Tensor:
    """tmp[p] = scales[p] * x[p // M] @ W[slot(p)] for every active pair p, fp32 [P, T, R]."""
    rows, T, K = x.shape  # x: [rows, T, K]
    R = W.shape[2]  # W: [S, K, R]
    _check_rank(R)
    tmp = _workspace((rows * M, T, R), x.device)  # [P, T, R]
    num_groups, max_pairs = int(meta.stats[0]), int(meta.stats[1])
    blocks = _blocks(x)
    grid = (triton.cdiv(max_pairs * T, blocks["BLOCK_T"]), num_groups)
    _lora_shrink_kernel[grid](
        x, W, tmp, scales, meta.pair_order, meta.group_slot, meta.group_start,
        T, K, R,
        *x.stride(), *W.stride(), *tmp.stride(), *scales.stride(),
        M=M,
        BLOCK_T=blocks["BLOCK_T"],
        BLOCK_K=_block(K, blocks["BLOCK_K"]),
        BLOCK_R=_block(R, _MAX_TRITON_RANK),
        **_dot_flags(x),
    )
    return tmp


def _lora_expand(tmp, W, y, slots) -> None:
    """y[r] += sum over m with slots[r, m] >= 0 of tmp[r*M + m] @ W[slots[r, m]], in place."""
    rows, T, N = y.shape  # y: [rows, T, N]
    R = W.shape[1]  # W: [S, R, N]
    _check_rank(R)
    M = slots.shape[1]  # slots: [rows, M]
    blocks = _blocks(y)
    block_n = _block(N, blocks["BLOCK_N"])
    grid = (triton.cdiv(T, blocks["BLOCK_T"]), rows, triton.cdiv(N, block_n))
    _lora_expand_kernel[grid](
        tmp, W, y, slots,
        T, N, R,
        *tmp.stride(), *W.stride(), *y.stride(), *slots.stride(),
        M=M,
        M_POW2=triton.next_power_of_2(M),
        BLOCK_T=blocks["BLOCK_T"],
        BLOCK_N=block_n,
        BLOCK_R=_block(R, _MAX_TRITON_RANK),
        PRECISION=_dot_flags(y)["PRECISION"],
    )


def _lora_grad_weight(left, left_div, right, right_div, dW, meta: LoraMeta) -> None:
    """dW[s] = sum over pairs p of slot s of left[p // left_div]^T @ right[p // right_div]."""
    T, KD = left.shape[1:]  # left: [*, T, KD]
    ND = right.shape[2]  # right: [*, T, ND]
    num_groups = int(meta.stats[0])
    blocks = _blocks(dW)
    block_kd = _block(KD, blocks["BLOCK_K"])
    block_nd = _block(ND, blocks["BLOCK_N"])
    grid = (num_groups, triton.cdiv(KD, block_kd), triton.cdiv(ND, block_nd))
    _lora_grad_weight_kernel[grid](
        left, right, dW, meta.pair_order, meta.group_slot, meta.group_start,
        T, KD, ND,
        *left.stride(), *right.stride(), *dW.stride(),
        L_DIV=left_div,
        R_DIV=right_div,
        BLOCK_T=blocks["BLOCK_T"],
        BLOCK_KD=block_kd,
        BLOCK_ND=block_nd,
        PRECISION=_dot_flags(dW)["PRECISION"],
    )


# ----------------------------------------------------------------------------------------------
# Backends (reference = plain PyTorch, triton = the kernels above)
# ----------------------------------------------------------------------------------------------


def _gather(A_pool, B_pool, slots, scales, dtype):
    """Per-pair weights and masked scales: A [rows, M, K, R], B [rows, M, R, N], s [rows, M].

    Pairs with slot -1 read slot 0 and are zeroed by `where` (not by a zero scale: 0 * inf is
    NaN), so whatever an unused or free pool slot holds never reaches the result.
    """
    used = slots >= 0
    idx = slots.clamp(min=0).long()
    s = torch.where(used, scales, 0.0).to(dtype)
    A = torch.where(used[:, :, None, None], A_pool[idx].to(dtype), 0.0)
    B = torch.where(used[:, :, None, None], B_pool[idx].to(dtype), 0.0)
    return A, B, s


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


def _segments(slots: torch.Tensor) -> list[tuple[int, int, int]]:
    """(slot, first row, end row) for each run of consecutive rows sharing one slot (M = 1)."""
    ids = slots[:, 0].tolist()
    runs, start = [], 0
    for r in range(1, len(ids) + 1):
        if r == len(ids) or ids[r] != ids[start]:
            if ids[start] >= 0:
                runs.append((ids[start], start, r))
            start = r
    return runs


def _lora_apply_segments(y, x, A_pool, B_pool, slots, scales, runs) -> None:
    """One adapter per row (M = 1), fp32/fp64 on CPU: per run of rows sharing a slot, two plain
    matmuls on the run's tokens straight from the pool, accumulated into y in place. A shared
    adapter is then PEFT's own arithmetic ([rows*T, K] @ A, @ B, scaled after B), and distinct ones
    need no per-layer gather of A and B. Pairs with slot -1 are never read, so free slots'
    contents (NaN included) never reach y."""
    rows, T, K = x.shape
    N = y.shape[2]
    row_scales = scales[:, 0].tolist()
    for slot, r0, r1 in runs:
        n = r1 - r0
        h = torch.mm(x[r0:r1].reshape(n * T, K), A_pool[slot])  # [n*T, R]
        alpha = row_scales[r0]
        if min(row_scales[r0:r1]) != max(row_scales[r0:r1]):
            h.view(n, T, -1).mul_(scales[r0:r1, :1, None])
            alpha = 1.0
        # else the GEMM's alpha applies the run's one scale: a pass over [n*T, R] saved, which at
        # 1024 tokens costs as much as the matmul
        ys = y[r0:r1]
        if ys.is_contiguous():
            ys.view(n * T, N).addmm_(h, B_pool[slot], alpha=alpha)
        else:
            ys.baddbmm_(h.view(n, T, -1), B_pool[slot].expand(n, *B_pool.shape[1:]), alpha=alpha)


def _lora_apply_rows(y, x, A_pool, B_pool, slots, scales) -> None:
    """One adapter per row (M = 1) and every row has one: the rows' A and B picked from the pool
    (two small copies of [rows, K, R] and [rows, R, N]) and two batched matmuls. Beats a matmul
    pair per run from two runs on (1.1-4x per projection at the SD-1.5-shaped UNet's widths,
    one thread); one run stays on `_lora_apply_segments`, PEFT's arithmetic."""
    T, K, N = x.shape[1], x.shape[2], y.shape[2]
    idx = slots[:, 0]  # index_select takes int32: no .long() copy (5 us a call, per layer per step)
    A, B = A_pool.index_select(0, idx), B_pool.index_select(0, idx)  # [rows, K, R], [rows, R, N]
    s = scales[:, :1, None]
    # The per-row scale goes on the smallest per-row operand: A's copy [K, R], B's [R, N] or the
    # intermediate [T, R] (1024 tokens at SD's 64x64 latents: a full extra pass there).
    if K <= min(T, N):
        A.mul_(s)
    elif N <= T:
        B.mul_(s)
    h = torch.bmm(x, A)  # [rows, T, R]
    if T < min(K, N):
        h.mul_(s)
    y.baddbmm_(h, B)


@dispatch.register("lora_apply", "reference", dtypes=_REFERENCE_DTYPES)
def _lora_apply_reference(y, x, A_pool, B_pool, slots, scales, meta: LoraMeta) -> None:
    groups, _, lo, hi, active = meta.stats.tolist()  # one read: this runs per layer per step
    if groups == 0:
        return  # no adapter anywhere: y is not touched
    if slots.shape[1] == 1 and y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64):
        if active == y.shape[0]:  # every row has an adapter: one run iff one slot
            if lo != hi:
                return _lora_apply_rows(y, x, A_pool, B_pool, slots, scales)
            return _lora_apply_segments(y, x, A_pool, B_pool, slots, scales, [(lo, 0, active)])
        return _lora_apply_segments(y, x, A_pool, B_pool, slots, scales, _segments(slots))
    _lora_apply_gathered(y, x, A_pool, B_pool, slots, scales, meta)


def _lora_apply_gathered(y, x, A_pool, B_pool, slots, scales, meta: LoraMeta) -> None:
    """Any table: every row's M adapters' weights gathered side by side, two batched matmuls."""
    if int(meta.stats[0]) == 0:
        return
    h, B = _shrink_ref(x, A_pool, B_pool, slots, scales, upcast=True)  # [rows, T, M*R], [rows, M*R, N]
    if int(meta.stats[4]) == y.shape[0] and y.dtype == h.dtype:
        y.baddbmm_(h, B)  # every row has an adapter: accumulate in place, one pass over y
        return
    # y + delta is computed in fp32 (or fp64) and rounded once to y's dtype. Rows without an
    # adapter keep their exact bits (adding 0.0 would turn -0.0 into +0.0).
    active = (slots >= 0).any(dim=1)[:, None, None]  # [rows, 1, 1]
    y.copy_(torch.where(active, torch.baddbmm(y.to(h.dtype), h, B).to(y.dtype), y))


@dispatch.register("lora_apply", "triton", dtypes=_TRITON_DTYPES)
def _lora_apply_triton(y, x, A_pool, B_pool, slots, scales, meta: LoraMeta) -> None:
    if int(meta.stats[0]) == 0:
        return
    tmp = _lora_shrink(x, A_pool, scales, meta, slots.shape[1])
    _lora_expand(tmp, B_pool, y, slots)


@dispatch.register("lora_delta_backward", "reference", dtypes=_REFERENCE_DTYPES)
def _lora_delta_backward_reference(dy, x, A_pool, B_pool, slots, scales, meta: LoraMeta):
    cdt = _compute_dtype(x.dtype, upcast=True)
    A, B, s = _gather(A_pool, B_pool, slots, scales, cdt)  # [rows, M, K, R], [rows, M, R, N]
    dy, xc = dy.to(cdt), x.to(cdt)
    g = torch.einsum("rtn,rmqn->rmtq", dy, B) * s[:, :, None, None]  # scale * dy @ B^T
    h = torch.einsum("rtk,rmkq->rmtq", xc, A) * s[:, :, None, None]  # scale * x @ A
    dx = torch.einsum("rmtq,rmkq->rtk", g, A)
    dA_pairs = torch.einsum("rtk,rmtq->rmkq", xc, g).flatten(0, 1)  # [P, K, R]
    dB_pairs = torch.einsum("rmtq,rtn->rmqn", h, dy).flatten(0, 1)  # [P, R, N]
    # Unused pairs have zero weights and scale, so adding them (to slot 0) adds exact zeros: no sync.
    idx = slots.clamp(min=0).reshape(-1).long()
    dA = torch.zeros(A_pool.shape, dtype=cdt, device=A_pool.device).index_add_(0, idx, dA_pairs)
    dB = torch.zeros(B_pool.shape, dtype=cdt, device=B_pool.device).index_add_(0, idx, dB_pairs)
    return dx.to(x.dtype), dA.to(A_pool.dtype), dB.to(B_pool.dtype)


@dispatch.register("lora_delta_backward", "triton", dtypes=_TRITON_DTYPES)
def _lora_delta_backward_triton(dy, x, A_pool, B_pool, slots, scales, meta: LoraMeta):
    dx, dA, dB = torch.zeros_like(x), torch.zeros_like(A_pool), torch.zeros_like(B_pool)
    if int(meta.stats[0]) == 0:
        return dx, dA, dB
    M = slots.shape[1]
    g = _lora_shrink(dy, B_pool.transpose(1, 2), scales, meta, M)  # [P, T, R]: scale * dy @ B^T
    _lora_expand(g, A_pool.transpose(1, 2), dx, slots)  # dx = sum_m g @ A^T
    h = _lora_shrink(x, A_pool, scales, meta, M)  # [P, T, R]: scale * x @ A
    _lora_grad_weight(x, M, g, 1, dA, meta)  # dA[s] = sum x^T @ g
    _lora_grad_weight(h, 1, dy, M, dB, meta)  # dB[s] = sum h^T @ dy
    return dx, dA, dB


# ----------------------------------------------------------------------------------------------
# Registration (torch.library, namespace "impasto")
# ----------------------------------------------------------------------------------------------
# custom_op, not triton_op + wrap_triton, for two reasons: (1) the launcher sizes its grid from
# the CPU-side counts in meta.stats and picks the backend at run time, which must stay opaque to
# torch.compile (triton_op lets Dynamo trace the launcher, where `int(stats[0])` would not
# trace); (2) under TRITON_INTERPRET=1, tracing a wrap_triton launch with fake tensors fails
# ("Cannot access data pointer of Tensor (e.g. FakeTensor ...)", checked with torch 2.13 and
# triton 3.7.1), so the compile tests could not run on CPU.
# The backend string "" means: resolve through dispatch (argument > context > env > default).


@torch.library.custom_op("impasto::lora_apply_", mutates_args=("y",))
def _lora_apply_op(
    y: torch.Tensor,
    x: torch.Tensor,
    A_pool: torch.Tensor,
    B_pool: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    pair_order: torch.Tensor,
    group_slot: torch.Tensor,
    group_start: torch.Tensor,
    stats: torch.Tensor,
    backend: str,
) -> None:
    meta = LoraMeta(pair_order, group_slot, group_start, stats)
    dispatch.resolve("lora_apply", x.device, x.dtype, backend)(y, x, A_pool, B_pool, slots, scales, meta)


@_lora_apply_op.register_fake
def _(y, x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats, backend):
    return None


@torch.library.custom_op("impasto::lora_delta", mutates_args=())
def _lora_delta_op(
    x: torch.Tensor,
    A_pool: torch.Tensor,
    B_pool: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    pair_order: torch.Tensor,
    group_slot: torch.Tensor,
    group_start: torch.Tensor,
    stats: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    y = x.new_zeros(*x.shape[:2], B_pool.shape[2])
    meta = LoraMeta(pair_order, group_slot, group_start, stats)
    dispatch.resolve("lora_apply", x.device, x.dtype, backend)(y, x, A_pool, B_pool, slots, scales, meta)
    return y


@_lora_delta_op.register_fake
def _(x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats, backend):
    return x.new_empty(*x.shape[:2], B_pool.shape[2])


@torch.library.custom_op("impasto::lora_delta_backward", mutates_args=())
def _lora_delta_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    A_pool: torch.Tensor,
    B_pool: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
    pair_order: torch.Tensor,
    group_slot: torch.Tensor,
    group_start: torch.Tensor,
    stats: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    meta = LoraMeta(pair_order, group_slot, group_start, stats)
    impl = dispatch.resolve("lora_delta_backward", x.device, x.dtype, backend)
    return impl(dy, x, A_pool, B_pool, slots, scales, meta)


@_lora_delta_backward_op.register_fake
def _(dy, x, A_pool, B_pool, slots, scales, pair_order, group_slot, group_start, stats, backend):
    return torch.empty_like(x), torch.empty_like(A_pool), torch.empty_like(B_pool)


# ----------------------------------------------------------------------------------------------
# Autograd (lora_delta only; lora_apply_ mutates and is for inference)
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.backend = inputs[9]


def _backward(ctx, dy):
    x, A_pool, B_pool, slots, scales, *meta = ctx.saved_tensors
    dx, dA, dB = torch.ops.impasto.lora_delta_backward(dy, x, A_pool, B_pool, slots, scales, *meta, ctx.backend)
    return dx, dA, dB, None, None, None, None, None, None, None


torch.library.register_autograd("impasto::lora_delta", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def lora_meta(slots: torch.Tensor, num_slots: int, *, out: LoraMeta | None = None) -> LoraMeta:
    """Group one step's (row, m) adapter pairs by slot; build once per step, pass to every layer.

    Semantics:
      pairs p = row * M + m with slots[row, m] >= 0, stably sorted by slot, form one group per
      distinct slot; group g holds pair_order[group_start[g]:group_start[g + 1]], all using
      slot group_slot[g]. Unused pairs sort last; groups past the active count are empty.
      Depends only on `slots`, so layers with different pools (same slot table) share it.

    Args:
      slots: Shape: `[rows, M]`, int32. Slot per row and adapter position, -1 = none.
      num_slots: S, the number of pool slots; every slot id must be < S.
      out: optional preallocated `LoraMeta` for these shapes (e.g. from a previous step),
        written in place and returned, so the step allocates nothing.

    Returns `LoraMeta(pair_order [P] int32, group_slot [S] int32, group_start [S + 1] int32,
    stats [5] int64 on CPU)`. The one device-to-host copy per step is `stats`, read by the
    launchers to size grids (the CPU-side count of vLLM's `LoRAKernelMeta`).
    """
    if slots.dim() != 2:
        raise ValueError(f"slots must be [rows, M], got shape {tuple(slots.shape)}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    device = slots.device
    flat = slots.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_slots), flat, num_slots)  # unused pairs last
    pair_order = torch.sort(key, stable=True).indices
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]  # [S] pairs per slot
    slot_start = torch.cumsum(counts, 0) - counts  # [S] first index into pair_order per slot
    present = counts > 0
    ids = torch.arange(num_slots, device=device)
    active = torch.sort(torch.where(present, ids, num_slots)).values  # active slot ids, then S
    is_group = active < num_slots
    total = counts.sum()
    group_slot = torch.where(is_group, active, -1)
    group_start = torch.where(is_group, slot_start[active.clamp(max=num_slots - 1)], total)
    group_start = torch.cat([group_start, total.reshape(1)])
    active_rows = (slots >= 0).any(dim=1).sum()
    stats = torch.stack([present.sum(), counts.max(), flat.min(), flat.max(), active_rows]).cpu()
    if not torch.compiler.is_compiling():
        if int(stats[2]) < -1 or int(stats[3]) >= num_slots:
            raise ValueError(f"slot ids must lie in [-1, {num_slots}), got [{int(stats[2])}, {int(stats[3])}]")
    meta = LoraMeta(pair_order.int(), group_slot.int(), group_start.int(), stats)
    if out is None:
        return meta
    for dst, src in zip(out, meta):
        dst.copy_(src)
    return out


def _check(x, A_pool, B_pool, slots, scales, y=None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be [rows, tokens, K], got shape {tuple(x.shape)}")
    rows, T, K = x.shape
    if A_pool.dim() != 3 or B_pool.dim() != 3 or A_pool.shape[1] != K or B_pool.shape[:2] != (A_pool.shape[0], A_pool.shape[2]):
        raise ValueError(
            f"pools must be A [S, K={K}, R] and B [S, R, N], got {tuple(A_pool.shape)} and {tuple(B_pool.shape)}"
        )
    if slots.dim() != 2 or slots.shape[0] != rows or slots.dtype != torch.int32:
        raise ValueError(f"slots must be int32 [rows={rows}, M], got {slots.dtype} {tuple(slots.shape)}")
    if scales.shape != slots.shape or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 {tuple(slots.shape)}, got {scales.dtype} {tuple(scales.shape)}")
    if not (x.dtype == A_pool.dtype == B_pool.dtype):
        raise ValueError(f"x, A_pool, B_pool must share a dtype, got {x.dtype}, {A_pool.dtype}, {B_pool.dtype}")
    if y is not None and (y.shape != (rows, T, B_pool.shape[2]) or y.dtype != x.dtype):
        raise ValueError(f"y must be {x.dtype} {(rows, T, B_pool.shape[2])}, got {y.dtype} {tuple(y.shape)}")


def lora_apply(y, x, A_pool, B_pool, slots, scales, *, meta: LoraMeta | None = None, backend: str | None = None):
    """Add every row's adapters' low-rank updates to y, in place; returns y.

    Semantics:
      for r in range(rows), m in range(M) with slots[r, m] >= 0, s = slots[r, m]:
          y[r] += scales[r, m] * (x[r] @ A_pool[s]) @ B_pool[s]
      The rank-R intermediate is fp32; y is rounded once. If no slot is used, y is untouched.

    Args:
      y: Shape: `[rows, T, N]`. Output; changed in place.
      x: Shape: `[rows, T, K]`. Input, same dtype as y (fp32, fp16, bf16; fp64 on reference).
      A_pool: Shape: `[S, K, R]`. Down weights of one layer and rank bucket, zero-padded to R.
      B_pool: Shape: `[S, R, N]`. Up weights.
      slots: Shape: `[rows, M]`, int32. Slot per row and adapter position, -1 = none.
      scales: Shape: `[rows, M]`, float32. user weight * alpha / r (or the rsLoRA scale).
      meta: `lora_meta(slots, S)`, built once per step; built here if None.
      backend: "reference", "triton" or "native"; None defers to `dispatch`.

    Inference only: for gradients use `lora_delta`.
    """
    _check(x, A_pool, B_pool, slots, scales, y)
    if meta is None:
        meta = lora_meta(slots, A_pool.shape[0])
    _check_meta(meta, slots, A_pool)
    if _eager(y, x, A_pool, B_pool):
        dispatch.resolve("lora_apply", x.device, x.dtype, backend)(y, x, A_pool, B_pool, slots, scales, meta)
    else:
        torch.ops.impasto.lora_apply_(y, x, A_pool, B_pool, slots, scales, *meta, backend or "")
    return y


def _eager(*tensors) -> bool:
    """Whether a call may skip the custom op and run the dispatch table's implementation itself:
    outside torch.compile's tracing and with no tensor that autograd would have to see. The op's
    eager dispatch (schema defaults, ADInplaceOrView, the dynamo-disable wrapper) costs more than a
    narrow layer's two small matmuls (benchmarks/RESULTS.md, "LoRA overhead"); under
    compile the op stays, since it is what keeps the launcher opaque to Dynamo."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def lora_delta(x, A_pool, B_pool, slots, scales, *, meta: LoraMeta | None = None, backend: str | None = None):
    """The adapters' low-rank updates as a new tensor, differentiable in x, A_pool and B_pool.

    Semantics:
      out = zeros(rows, T, N, dtype=x.dtype); then out[r] += ... exactly as `lora_apply`.
      Gradients: dx[r] = sum_m scales[r, m] * (dy[r] @ B[s]^T) @ A[s]^T;
      dA[s] = sum over (r, m) using s of scales[r, m] * x[r]^T @ (dy[r] @ B[s]^T);
      dB[s] = sum over (r, m) using s of scales[r, m] * (x[r] @ A[s])^T @ dy[r];
      slots nobody uses get zero gradient. scales and slots get none.

    Args: as `lora_apply` (no y). Returns: Shape: `[rows, T, N]`, x's dtype.
    """
    _check(x, A_pool, B_pool, slots, scales)
    if meta is None:
        meta = lora_meta(slots, A_pool.shape[0])
    _check_meta(meta, slots, A_pool)
    return torch.ops.impasto.lora_delta(x, A_pool, B_pool, slots, scales, *meta, backend or "")


def lora_delta_ref(x, A_pool, B_pool, slots, scales, *, upcast: bool = True) -> torch.Tensor:
    """Plain-PyTorch `lora_delta`, vectorized (gathered weights + batched matmuls), no autograd.Function.

    Semantics: as `lora_delta`. Computes in fp32 (fp64 for fp64 inputs) and returns that dtype;
    with upcast=False computes and returns in the input dtype (the low-precision reference of
    flash-attention's "2x the PyTorch error" rule). Pairs with slot -1 contribute exactly 0.
    """
    h, B = _shrink_ref(x, A_pool, B_pool, slots, scales, upcast)  # [rows, T, M*R], [rows, M*R, N]
    return torch.bmm(h, B)  # [rows, T, N]


def _shrink_ref(x, A_pool, B_pool, slots, scales, upcast: bool):
    """h = x @ (scale * A) with the M adapters side by side, and the matching stacked B.

    Laid out for two plain batched matmuls: h [rows, T, M*R] @ B [rows, M*R, N] sums the M
    adapters inside the second matmul's reduction, so no activation-sized tensor is permuted.
    """
    cdt = _compute_dtype(x.dtype, upcast)
    A, B, s = _gather(A_pool, B_pool, slots, scales, cdt)  # [rows, M, K, R], [rows, M, R, N], [rows, M]
    rows, M, K, R = A.shape
    A = (A * s[:, :, None, None]).permute(0, 2, 1, 3).reshape(rows, K, M * R)  # weights only: small
    return torch.bmm(x.to(cdt), A), B.reshape(rows, M * R, B.shape[3])
