"""Shared numerics for kernel tests: one dtype-keyed tolerance table and one `assert_close`.

Tolerances: Punica's for fp16 (5e-3) and bf16 (3e-2 rtol / 2e-2 atol), torch's defaults for fp32
and fp64. For fp16/bf16, flash-attention's rule is also accepted: the kernel's max error against
the fp32 reference is at most twice the max error of a PyTorch implementation run in the low
precision (plus atol), because rounding to 16 bits, not the kernel, dominates there.
"""

import torch

# dtype -> (rtol, atol)
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for results of `dtype`."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, lowp: torch.Tensor | None = None, msg: str = "") -> None:
    """Check `actual` against `expected` (a higher-precision reference) with `actual`'s tolerances.

    lowp: the same computation done by PyTorch in `actual`'s (low) precision; when given, an
    error up to 2 * |lowp - expected|.max() + atol is also accepted (flash-attention's rule).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    rtol, atol = tolerance(actual.dtype)
    a, e = actual.double(), expected.double()
    if torch.allclose(a, e, rtol=rtol, atol=atol, equal_nan=True):
        return
    err = (a - e).abs().nan_to_num(nan=float("inf")).max().item()
    detail = f"max abs error {err:.3g} exceeds rtol={rtol}, atol={atol}"
    if lowp is not None:
        lowp_err = (lowp.double() - e).abs().max().item()
        bound = 2 * lowp_err + atol
        if err <= bound:
            return
        detail += f" and 2 x low-precision PyTorch error + atol = {bound:.3g}"
    worst = (a - e).abs().nan_to_num(nan=float("inf")).argmax().item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
    raise AssertionError(f"{msg}: {detail}; worst at {idx}: {a[idx].item()!r} vs {e[idx].item()!r}")
