"""Guidance blend for batched diffusion: every request's branch predictions become its noise.

Pair Customization's style guidance (arXiv 2405.01536 eq. 10/11; PairCustomization
`modules/StableDiffusionXLPipelineLoraGuidance.py`) extends classifier-free guidance with one
branch per style, each run with its style LoRA and the prompt plus the style suffix:

    e = e_u + cfg * (e_c - e_u) + sum_i w_i * (e_s_i - e_c)

then, optionally, diffusers' guidance rescale (`rescale_noise_cfg`, arXiv 2305.08891 §3.4),
computed against e_c. With no styles this is exactly diffusers' classifier-free guidance.

The engine runs the branch rows of every request in ONE UNet forward per step; this family
blends all of them in one fused pass over the noise predictions. Requests are ragged (different
branch and image counts), so a fixed-size `BranchTable`, built once per request group by
`build_branch_table`, says for each output latent which rows to read (diffusers' guiders
declare their `_input_predictions` the same way).

Design: two kernels over a grid of (latent, block of L), no atomics, deterministic.
  * The rescale needs std(e) and std(e_c) over each latent's L = C*H*W elements, a reduction
    over the whole latent before any element can be written. One program per latent looping over
    L would give a GPU only `latents` programs (8-32 for a typical step, far fewer than SMs), so
    L is split: pass 1 (`_guidance_stats_kernel`) writes each block's count-free moments (mean and
    centered sum of squares M2, for e and e_c) to a small fp32 workspace; pass 2
    (`_guidance_apply_kernel`) merges a latent's blocks with the exact parallel formula
    (Chan et al.: M2 = sum M2_b + sum n_b (mean_b - mean)^2; no sum-of-squares cancellation),
    recomputes its block of e from the inputs (re-reading (2+k) rows costs about what an fp32
    workspace write + read of e would, and allocates nothing activation-sized) and writes
    e * rescale factor, rounded once to the output dtype.
  * Latents with rescale 0 skip pass 1 and are one read of their rows and one write; when no
    latent rescales (the table's CPU stats say so), pass 1 is not launched.
  * Arithmetic is fp32 whatever the input dtype, in the same op order as diffusers; with
    `enable_fp_fusion=False` no mul+add is contracted into an FMA, so for fp32 inputs without
    rescale the result equals diffusers' `e_u + cfg * (e_c - e_u)` bit for bit.
Limits: untuned block sizes; the Triton path has only been run under the interpreter
(TRITON_INTERPRET=1) on CPU tensors. No backward (inference only).

Legend: rows = UNet batch rows (every branch of every request), L = C*H*W elements of one
prediction, J = output latents (sum over requests of images N), S = style capacity per latent
(max styles in the group), nb = blocks of L.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import dispatch

# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

# Untuned. The interpreter pays ~2-4 ms per block-level operation whatever the block size, so
# under it one block covers a whole test latent. Tests lower BLOCK_L to exercise the merge.
_GPU_BLOCKS = dict(BLOCK_L=1024)
_INTERPRET_BLOCKS = dict(BLOCK_L=4096)

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REFERENCE_DTYPES = (torch.float64, *_TRITON_DTYPES)

# Set by tests: workspaces that the kernels must fully write before reading are filled with NaN
# instead of left uninitialized, so a missed write shows up.
_POISON_WORKSPACE = False


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(t: torch.Tensor) -> dict:
    return _INTERPRET_BLOCKS if _interpreting(t) else _GPU_BLOCKS


def _workspace(shape, device) -> torch.Tensor:
    if _POISON_WORKSPACE:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _guided_block(
    X,  # pointer to the predictions, [rows, L]
    UncondRow,  # pointer to the uncond row per latent, int32 [J]; -1 = none
    CondRow,  # pointer to the cond row per latent, int32 [J]
    StyleRows,  # pointer to the style rows per latent, int32 [J, S]; -1 = none
    StyleWeights,  # pointer to the style weights, float32 [J, S]
    Cfg,  # pointer to the guidance scale per latent, float32 [J]
    j,  # the latent
    offs,  # element offsets of this block, [BLOCK_L]
    mask,  # offs < L
    stride_xr,  # row stride of X
    stride_sj, stride_ss,  # strides of StyleRows and StyleWeights
    S: tl.constexpr,  # style capacity
):
    # Returns (e, e_c) in fp32 for one block of latent j; lanes past L hold 0.
    # Op order is diffusers': e_u + cfg * (e_c - e_u), then += w_i * (e_s_i - e_c) in style order.
    cond = tl.load(CondRow + j).to(tl.int64)
    e_c = tl.load(X + cond * stride_xr + offs, mask=mask, other=0.0).to(tl.float32)
    uncond = tl.load(UncondRow + j).to(tl.int64)
    e = e_c
    if uncond >= 0:
        cfg = tl.load(Cfg + j)
        e_u = tl.load(X + uncond * stride_xr + offs, mask=mask, other=0.0).to(tl.float32)
        e = e_u + cfg * (e_c - e_u)
    for s in tl.static_range(S):
        row = tl.load(StyleRows + j * stride_sj + s * stride_ss).to(tl.int64)
        if row >= 0:
            w = tl.load(StyleWeights + j * stride_sj + s * stride_ss)
            e_s = tl.load(X + row * stride_xr + offs, mask=mask, other=0.0).to(tl.float32)
            e = e + w * (e_s - e_c)
    return e, e_c


@triton.jit
def _guidance_stats_kernel(
    X,  # pointer to the predictions, [rows, L]
    Stats,  # pointer to the moments workspace, float32 [J, nb, 4]: mean_e, M2_e, mean_c, M2_c
    UncondRow, CondRow, StyleRows, StyleWeights, Cfg,  # the BranchTable, as in _guided_block
    Rescale,  # pointer to the rescale factor per latent, float32 [J]
    L,  # elements per prediction
    stride_xr,  # row stride of X
    stride_sj, stride_ss,  # strides of StyleRows and StyleWeights
    stride_tj, stride_tb,  # strides of Stats (last dim contiguous)
    S: tl.constexpr,  # style capacity
    BLOCK_L: tl.constexpr,  # elements per program
):
    # Program (j, b): moments of block b of latent j, for e and e_c. Latents with rescale 0 are
    # skipped; pass 2 does not read their moments.
    j = tl.program_id(0)
    b = tl.program_id(1)
    if tl.load(Rescale + j) <= 0.0:
        return
    offs = b * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = offs < L
    e, e_c = _guided_block(
        X, UncondRow, CondRow, StyleRows, StyleWeights, Cfg, j, offs, mask, stride_xr, stride_sj, stride_ss, S
    )
    n = tl.minimum(L - b * BLOCK_L, BLOCK_L).to(tl.float32)
    mean_e = tl.sum(e, axis=0) / n
    mean_c = tl.sum(e_c, axis=0) / n
    d_e = tl.where(mask, e - mean_e, 0.0)
    d_c = tl.where(mask, e_c - mean_c, 0.0)
    base = Stats + j.to(tl.int64) * stride_tj + b * stride_tb
    tl.store(base + 0, mean_e)
    tl.store(base + 1, tl.sum(d_e * d_e, axis=0))
    tl.store(base + 2, mean_c)
    tl.store(base + 3, tl.sum(d_c * d_c, axis=0))


@triton.jit
def _guidance_apply_kernel(
    X,  # pointer to the predictions, [rows, L]
    Out,  # pointer to the output, [J, L]
    Stats,  # pointer to the moments workspace, float32 [J, nb, 4] (read only where rescale > 0)
    UncondRow, CondRow, StyleRows, StyleWeights, Cfg,  # the BranchTable, as in _guided_block
    Rescale,  # pointer to the rescale factor per latent, float32 [J]
    L,  # elements per prediction
    NB,  # blocks per latent (nb)
    stride_xr,  # row stride of X
    stride_or,  # row stride of Out
    stride_sj, stride_ss,  # strides of StyleRows and StyleWeights
    stride_tj, stride_tb,  # strides of Stats (last dim contiguous)
    S: tl.constexpr,  # style capacity
    BLOCK_L: tl.constexpr,  # elements per program
    BLOCK_NB: tl.constexpr,  # covers nb in one block
):
    # Program (j, b) owns Out[j, block b]: the only writer, one rounding.
    j = tl.program_id(0)
    b = tl.program_id(1)
    offs = b * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = offs < L
    e, e_c = _guided_block(
        X, UncondRow, CondRow, StyleRows, StyleWeights, Cfg, j, offs, mask, stride_xr, stride_sj, stride_ss, S
    )
    phi = tl.load(Rescale + j)
    if phi > 0.0:
        # Merge the latent's nb block moments: mean = sum n_b mean_b / L,
        # M2 = sum M2_b + sum n_b (mean_b - mean)^2, std = sqrt(M2 / (L - 1)) (torch.std's N - 1).
        blk = tl.arange(0, BLOCK_NB)
        valid = blk < NB
        n_b = tl.where(valid, tl.minimum(L - blk * BLOCK_L, BLOCK_L), 0).to(tl.float32)
        base = Stats + j.to(tl.int64) * stride_tj + blk * stride_tb
        mean_eb = tl.load(base + 0, mask=valid, other=0.0)
        m2_eb = tl.load(base + 1, mask=valid, other=0.0)
        mean_cb = tl.load(base + 2, mask=valid, other=0.0)
        m2_cb = tl.load(base + 3, mask=valid, other=0.0)
        total = L * 1.0  # (L may arrive as a constexpr)
        mean_e = tl.sum(n_b * mean_eb, axis=0) / total
        mean_c = tl.sum(n_b * mean_cb, axis=0) / total
        d_e = tl.where(valid, mean_eb - mean_e, 0.0)
        d_c = tl.where(valid, mean_cb - mean_c, 0.0)
        m2_e = tl.sum(m2_eb, axis=0) + tl.sum(n_b * d_e * d_e, axis=0)
        m2_c = tl.sum(m2_cb, axis=0) + tl.sum(n_b * d_c * d_c, axis=0)
        std_e = tl.sqrt_rn(tl.div_rn(m2_e, total - 1.0))
        std_c = tl.sqrt_rn(tl.div_rn(m2_c, total - 1.0))
        # diffusers: phi * (e * (std_c / std_e)) + (1 - phi) * e
        e = phi * (e * tl.div_rn(std_c, std_e)) + (1.0 - phi) * e
    tl.store(Out + j.to(tl.int64) * stride_or + offs, e.to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


class BranchTable(NamedTuple):
    """Which prediction rows each output latent blends, built once per request group by
    `build_branch_table` and reused every step (fixed size: nothing is built in the step).

    Running example (rows are laid out per request as [uncond x N, cond x N, style_1 x N, ...]):
      request A: start 0, N=2, uncond, cfg 7.5, styles [4.5, 3.0], rescale 0.7 -> rows 0-7
      request B: start 8, N=1, no uncond (cfg <= 1), no styles, rescale 0     -> row 8
      request C: start 9, N=1, uncond, cfg 5.0, styles [4.0], rescale 0       -> rows 9-11
    gives J = 4 latents (A's two images, B, C), S = 2 style slots:
    """

    uncond_row: torch.Tensor  # int32 [J]: [0, 1, -1, 9]
    cond_row: torch.Tensor  # int32 [J]: [2, 3, 8, 10]
    style_rows: torch.Tensor  # int32 [J, S]: [[4, 6], [5, 7], [-1, -1], [11, -1]]
    style_weights: torch.Tensor  # float32 [J, S]: [[4.5, 3.0], [4.5, 3.0], [0, 0], [4.0, 0]]
    cfg: torch.Tensor  # float32 [J]: [7.5, 7.5, 1.0, 5.0] (ignored where uncond_row is -1)
    rescale: torch.Tensor  # float32 [J]: [0.7, 0.7, 0.0, 0.0]
    # int64 [2] on CPU: rows the table reads (max row + 1), latents with rescale > 0: [12, 2]
    stats: torch.Tensor


@dataclass(frozen=True)
class RequestBranches:
    """One request's branches, as `build_branch_table` reads them (any object with these
    attributes will do; `style_weights` may be absent, meaning no styles).

    Rows from `start`: [uncond x images if has_uncond, cond x images, style_1 x images, ...].
    """

    start: int
    images: int
    cfg: float
    has_uncond: bool
    style_weights: Sequence[float] = ()
    rescale: float = 0.0


def _launch(out2d: torch.Tensor, x: torch.Tensor, table: BranchTable) -> None:
    """out2d [J, L] = the blend of x [rows, L] (row stride free, elements contiguous)."""
    J, L = out2d.shape
    if J == 0 or L == 0:
        return
    S = table.style_rows.shape[1]
    block_l = min(_blocks(x)["BLOCK_L"], triton.next_power_of_2(L))
    nb = triton.cdiv(L, block_l)
    rescaled = int(table.stats[1]) > 0
    stats = _workspace((J, nb, 4) if rescaled else (1, 1, 4), x.device)
    # style_rows and style_weights share a shape; both are contiguous (checked), so share strides.
    sj, ss = table.style_rows.stride() if S > 0 else (0, 0)
    tbl = (table.uncond_row, table.cond_row, table.style_rows, table.style_weights, table.cfg)
    # No FMA contraction: e_u + cfg * (e_c - e_u) rounds as PyTorch's three ops do.
    flags = dict(enable_fp_fusion=False) if not _interpreting(x) else {}
    if rescaled:
        _guidance_stats_kernel[(J, nb)](
            x, stats, *tbl, table.rescale,
            L,
            x.stride(0),
            sj, ss,
            stats.stride(0), stats.stride(1),
            S=S,
            BLOCK_L=block_l,
            **flags,
        )
    _guidance_apply_kernel[(J, nb)](
        x, out2d, stats, *tbl, table.rescale,
        L, nb,
        x.stride(0),
        out2d.stride(0),
        sj, ss,
        stats.stride(0), stats.stride(1),
        S=S,
        BLOCK_L=block_l,
        BLOCK_NB=triton.next_power_of_2(nb),
        **flags,
    )


# ----------------------------------------------------------------------------------------------
# Backends (reference = plain PyTorch, triton = the kernels above)
# ----------------------------------------------------------------------------------------------


def _rows_view(noise: torch.Tensor) -> torch.Tensor:
    """noise as [rows, L] with contiguous elements (a view when the layout allows it)."""
    x = noise.reshape(noise.shape[0], -1)
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


@dispatch.register("guidance_blend", "reference", dtypes=_REFERENCE_DTYPES)
def _guidance_blend_reference(out, noise, table: BranchTable) -> None:
    out.copy_(guidance_blend_ref(noise, table))


@dispatch.register("guidance_blend", "triton", dtypes=_TRITON_DTYPES)
def _guidance_blend_triton(out, noise, table: BranchTable) -> None:
    _launch(out.view(out.shape[0], -1), _rows_view(noise), table)


# ----------------------------------------------------------------------------------------------
# Registration (torch.library, namespace "impasto")
# ----------------------------------------------------------------------------------------------
# custom_op rather than triton_op, as for lora (kernels/lora.py): the launcher reads the CPU-side
# table.stats to skip pass 1 and picks the backend at run time, which must stay opaque to
# torch.compile, and wrap_triton cannot trace fake tensors under the interpreter.
# The backend string "" means: resolve through dispatch (argument > context > env > default).


@torch.library.custom_op("impasto::guidance_blend_", mutates_args=("out",))
def _guidance_blend_op(
    out: torch.Tensor,
    noise: torch.Tensor,
    uncond_row: torch.Tensor,
    cond_row: torch.Tensor,
    style_rows: torch.Tensor,
    style_weights: torch.Tensor,
    cfg: torch.Tensor,
    rescale: torch.Tensor,
    stats: torch.Tensor,
    backend: str,
) -> None:
    table = BranchTable(uncond_row, cond_row, style_rows, style_weights, cfg, rescale, stats)
    dispatch.resolve("guidance_blend", noise.device, noise.dtype, backend)(out, noise, table)


@_guidance_blend_op.register_fake
def _(out, noise, uncond_row, cond_row, style_rows, style_weights, cfg, rescale, stats, backend):
    return None


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def build_branch_table(
    requests: Sequence, *, max_styles: int | None = None, device: torch.device | str | None = None
) -> BranchTable:
    """The `BranchTable` of a request group: one entry per output latent, in request order.

    Semantics:
      for each request r (N = r.images, k = len(r.style_weights), u = 1 if r.has_uncond else 0),
      for n in range(N), the next latent j gets
          uncond_row[j] = r.start + n if u else -1
          cond_row[j] = r.start + u*N + n
          style_rows[j, i] = r.start + (u + 1 + i)*N + n, style_weights[j, i] = r.style_weights[i]
            for i < k; -1 and 0.0 for k <= i < S
          cfg[j] = r.cfg, rescale[j] = r.rescale

    Args:
      requests: objects with `start`, `images`, `cfg`, `has_uncond`, `rescale` and optionally
        `style_weights` (a sequence of floats), e.g. `RequestBranches`.
      max_styles: S, the style capacity; default the most styles of any request. A larger S lets
        one table shape serve groups with more styles (the kernel is compiled per S).
      device: where the table lives (stats always stays on the CPU).
    """
    uncond, cond, styles, weights, cfg, rescale = [], [], [], [], [], []
    counts = [len(getattr(r, "style_weights", ()) or ()) for r in requests]
    S = max(counts, default=0) if max_styles is None else max_styles
    if S < max(counts, default=0):
        raise ValueError(f"max_styles={S} but a request has {max(counts)} styles")
    end = 0
    for r, k in zip(requests, counts):
        N, u = int(r.images), int(bool(r.has_uncond))
        if N < 1 or r.start < 0:
            raise ValueError(f"request needs images >= 1 and start >= 0, got images={N}, start={r.start}")
        w = [float(v) for v in (getattr(r, "style_weights", ()) or ())]
        for n in range(N):
            uncond.append(r.start + n if u else -1)
            cond.append(r.start + u * N + n)
            styles.append([r.start + (u + 1 + i) * N + n for i in range(k)] + [-1] * (S - k))
            weights.append(w + [0.0] * (S - k))
            cfg.append(float(r.cfg))
            rescale.append(float(r.rescale))
        end = max(end, r.start + (u + 1 + k) * N)
    J = len(cond)
    i32 = dict(dtype=torch.int32, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    return BranchTable(
        uncond_row=torch.tensor(uncond, **i32),
        cond_row=torch.tensor(cond, **i32),
        style_rows=torch.tensor(styles, **i32).reshape(J, S),
        style_weights=torch.tensor(weights, **f32).reshape(J, S),
        cfg=torch.tensor(cfg, **f32),
        rescale=torch.tensor(rescale, **f32),
        stats=torch.tensor([end, sum(p > 0 for p in rescale)], dtype=torch.int64),
    )


def _check(noise: torch.Tensor, table: BranchTable, out: torch.Tensor | None = None) -> None:
    if noise.dim() < 2:
        raise ValueError(f"noise must be [rows, ...] with elements per row, got shape {tuple(noise.shape)}")
    J = table.cond_row.shape[0]
    for name in ("uncond_row", "cond_row", "cfg", "rescale"):
        t = getattr(table, name)
        if t.shape != (J,):
            raise ValueError(f"table.{name} must be [J={J}], got {tuple(t.shape)}")
    if table.style_rows.dim() != 2 or table.style_rows.shape[0] != J or table.style_weights.shape != table.style_rows.shape:
        raise ValueError(
            f"table.style_rows and style_weights must be [J={J}, S], got "
            f"{tuple(table.style_rows.shape)} and {tuple(table.style_weights.shape)}"
        )
    for name, dtype in (("uncond_row", torch.int32), ("cond_row", torch.int32), ("style_rows", torch.int32),
                        ("style_weights", torch.float32), ("cfg", torch.float32), ("rescale", torch.float32)):
        t = getattr(table, name)
        if t.dtype != dtype or t.device != noise.device or not t.is_contiguous():
            raise ValueError(f"table.{name} must be contiguous {dtype} on {noise.device}, got {t.dtype} on {t.device}")
    if table.stats.device.type != "cpu" or table.stats.shape != (2,):
        raise ValueError("table.stats must be a CPU tensor of 2 entries (from build_branch_table)")
    if not torch.compiler.is_compiling() and int(table.stats[0]) > noise.shape[0]:
        raise ValueError(f"the table reads {int(table.stats[0])} rows, noise has {noise.shape[0]}")
    if out is not None:
        shape = (J, *noise.shape[1:])
        if out.shape != shape or out.dtype != noise.dtype or not out.is_contiguous():
            raise ValueError(f"out must be contiguous {noise.dtype} {shape}, got {out.dtype} {tuple(out.shape)}")


def guidance_blend(
    noise: torch.Tensor, table: BranchTable, *, out: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """Blend every request's branch predictions into its latents' noise predictions; returns out.

    Semantics: `guidance_blend_ref` (the formula is in its docstring), computed in fp32 and
    rounded once to noise's dtype.

    Args:
      noise: Shape: `[rows, C, H, W]` (any trailing shape, any layout; read as `[rows, L]`). The
        UNet output of every branch row of every request (fp32, fp16, bf16; fp64 on reference).
      table: `build_branch_table(requests)`, built once per request group.
      out: Shape: `[J, C, H, W]`, contiguous, noise's dtype. Written (every element), if given;
        allocated otherwise.
      backend: "reference", "triton" or "native"; None defers to `dispatch`.
    """
    _check(noise, table, out)
    if out is None:
        out = noise.new_empty(table.cond_row.shape[0], *noise.shape[1:])
    torch.ops.impasto.guidance_blend_(out, noise, *table, backend or "")
    return out


def guidance_blend_ref(noise: torch.Tensor, table: BranchTable) -> torch.Tensor:
    """Plain-PyTorch `guidance_blend`: the ground truth of the tests and the CPU path.

    Semantics, for every latent j (e_x = noise[x_row[j]] as fp32, or fp64 for fp64 noise):
      e = e_u + cfg[j] * (e_c - e_u)             if uncond_row[j] >= 0 (classifier-free guidance)
      e = e_c                                     otherwise (diffusers: CFG off; cfg is ignored)
      for i in range(S) with style_rows[j, i] >= 0:
          e = e + style_weights[j, i] * (e_s_i - e_c)       (Pair Customization eq. 10/11)
      if rescale[j] > 0 (diffusers' rescale_noise_cfg(e, e_c, rescale[j])):
          std_c, std_e = e_c.std(), e.std()       over the latent's C*H*W elements, unbiased (N - 1)
          e = rescale[j] * (e * (std_c / std_e)) + (1 - rescale[j]) * e
      out[j] = e, rounded to noise's dtype.
    The op order is diffusers', so fp32 without rescale equals its CFG bit for bit. Unused style
    slots and a missing uncond are excluded by `where`, so whatever their rows hold never enters.

    Returns: Shape: `[J, *noise.shape[1:]]`, noise's dtype.
    """
    cdt = torch.promote_types(noise.dtype, torch.float32)
    x = noise.reshape(noise.shape[0], -1)  # [rows, L]

    def rows(idx):  # [J] int32 -> [J, L]; -1 reads row 0, masked by the caller
        return x[idx.clamp(min=0).long()].to(cdt)

    e_c = rows(table.cond_row)
    e_u = rows(table.uncond_row)
    cfg = table.cfg.to(cdt)[:, None]
    e = torch.where((table.uncond_row >= 0)[:, None], e_u + cfg * (e_c - e_u), e_c)
    for i in range(table.style_rows.shape[1]):
        used = (table.style_rows[:, i] >= 0)[:, None]
        w = table.style_weights[:, i].to(cdt)[:, None]
        e = torch.where(used, e + w * (rows(table.style_rows[:, i]) - e_c), e)
    if int(table.stats[1]) > 0:
        phi = table.rescale.to(cdt)[:, None]
        std_c = e_c.std(dim=1, keepdim=True)
        std_e = e.std(dim=1, keepdim=True)
        e = torch.where(phi > 0, phi * (e * (std_c / std_e)) + (1 - phi) * e, e)
    return e.to(noise.dtype).reshape(e.shape[0], *noise.shape[1:])
