"""LoRA variants that are not one low-rank pair on a Linear: conv LoRA (LoCon), LoHa, LoKr, DoRA.

The slot pools (lora.py) serve `y += s * (x @ A) @ B` on Linear / 1x1-conv modules. The layouts
here change a module in other ways, so they are applied per row by a second path of the same
forward hook, grouped by adapter (never merged into the base weights):

Semantics, for a module with base weight W0 (Shape [out, in] or [out, in, kh, kw]), bias b and
op(x, W) = F.linear(x, W) or F.conv2d(x, W, stride, padding, dilation, groups) of the base module,
for every row r naming the adapter at the user's scale s (c: the file's scale, alpha / r):

    conv   ("LoCon"): y[r] += s * c * conv1x1(op(x[r], down), up)           down [r, in, kh, kw], up [out, r]
    loha            : y[r] += s * op(x[r], dW),  dW = c * (w1_a @ w1_b) * (w2_a @ w2_b)   (Hadamard)
                      with Tucker cores t1, t2: each factor is einsum("ij..., jr, ip -> pr...", t, w_b, w_a)
    lokr            : y[r] += s * op(x[r], dW),  dW = c * kron(w1, w2), w1 = w1 | w1_a @ w1_b,
                      w2 = w2 | w2_a @ w2_b | einsum("ij..., jr, ip -> pr...", t2, w2_b, w2_a)
    dora            : g = m / ||W0 + s*c*(up @ down)||_row       (norm over every axis but out)
                      y[r] += (g - 1) * (y0[r] - b) + g * s * c * up(down(x[r]))
    full            : y[r] += s * (x[r] @ diff.T + diff_b)     diff [out, in], diff_b [out] (optional):
                      a dense fine-tuned change of a Linear and its bias; no LoRA file layout is read
                      into it, the kv family builds it for Custom Diffusion's Q/out (families/kv.py)
    y0: the module's base output. dW is reshaped to W0's shape.

Costs, and what is cached. LoHa/LoKr dW is rebuilt from the factors in every forward, one layer
at a time: rebuilding costs out*in*r multiply-adds, applying it costs out*in*(rows*tokens), so the
rebuild is a small share of the layer (tokens >= 64 at every UNet resolution) and no dense
[out, in] matrix per adapter and layer is ever held (a full-UNet LoHa would hold a full UNet's
worth of weights per adapter). DoRA's row norms depend on W0, the adapter and the user's scale:
they are computed once per (adapter, scale) when a batch's tables are built (`variant_tables`)
and reused by every step of that batch. Refused: compile mode (its fixed pools hold low-rank
linear attention projections only; the variants gather rows by adapter, a data-dependent shape),
text-encoder variants, LyCORIS DoRA (`dora_scale`), Tucker LoCon (`lora_mid`).

Multiple DoRA adapters on one module of one row each rescale the base output y0 (PEFT's own
forward rescales the running output, which makes the result depend on the adapters' order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import AdapterFormatError, AdapterShapeError, AdapterUnsupportedError

KINDS = ("conv", "loha", "lokr", "dora", "full")
VARIANTS = "variants"  # the key of the per-module variant table inside a LoRA runtime's tables

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ROLE_SUFFIXES = tuple("." + r for r in LOHA_ROLES + LOKR_ROLES)


@dataclass(frozen=True)
class VariantLayerInfo:
    """One module's variant as the header describes it; no weight data."""

    kind: str  # one of KINDS
    keys: dict  # role -> the file's key (down, up, magnitude, hada_*, lokr_*)
    shapes: dict  # role -> stored shape
    rank: int  # the factors' rank (0: LoKr with both halves full)
    scale: float  # c: alpha / r (1 for LoKr with both halves full)
    nbytes: int


@dataclass
class VariantLayer:
    """One module's variant, read and validated."""

    kind: str
    tensors: dict  # role -> tensor, engine dtype
    rank: int
    scale: float


def classify(path: str, module: str, roles: dict, shapes: dict) -> str | None:
    """The variant kind of one module's keys (roles -> key), None for a plain pool LoRA
    (2-D or 1x1 down/up); AdapterFormatError naming the keys for a set no layout has."""
    have = set(roles) - {"alpha"}
    if have and have <= set(LOHA_ROLES):
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
        if not need <= have or ("hada_t1" in have) != ("hada_t2" in have):
            raise AdapterFormatError(f"{path}: LoHa module {module!r} has keys {sorted(roles.values())}, "
                                     "not w1_a/w1_b/w2_a/w2_b (and both or neither of t1/t2)")
        return "loha"
    if have and have <= set(LOKR_ROLES):
        ok1 = ("lokr_w1" in have) != ({"lokr_w1_a", "lokr_w1_b"} <= have) and not (
            "lokr_w1" in have and have & {"lokr_w1_a", "lokr_w1_b"})
        ok2 = ("lokr_w2" in have) != ({"lokr_w2_a", "lokr_w2_b"} <= have) and not (
            "lokr_w2" in have and have & {"lokr_w2_a", "lokr_w2_b", "lokr_t2"})
        if not (ok1 and ok2):
            raise AdapterFormatError(f"{path}: LoKr module {module!r} has keys {sorted(roles.values())}: each "
                                     "half must be lokr_wN or the pair lokr_wN_a/lokr_wN_b")
        return "lokr"
    if have == {"down", "up", "magnitude"}:
        return "dora"
    if have == {"down", "up"}:
        ds = shapes[roles["down"]]
        return "conv" if len(ds) == 4 and tuple(ds[2:]) != (1, 1) else None
    raise AdapterFormatError(f"{path}: module {module!r} has keys {sorted(roles.values())}, which no LoRA, LoCon, "
                             "LoHa, LoKr or DoRA layout has")


def rank_of(kind: str, shapes: dict) -> int:
    """The factors' rank, read from the shapes (roles -> shape)."""
    if kind in ("conv", "dora"):
        return int(shapes["down"][0])
    if kind == "loha":
        return int(shapes["hada_w1_b"][0])
    for role in ("lokr_w1_b", "lokr_w2_b"):  # lycoris factorizes one side only, the larger
        if role in shapes:
            return int(shapes[role][0])
    return 0


def weight_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The base weight's shape of a Linear or Conv2d, None for anything else."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
        return tuple(module.weight.shape)
    return None


def _factor_shape(kind: str, s: dict) -> tuple[int, ...]:
    """The shape of dW the factors' shapes imply, without computing it (a 2-D shape when the
    conv kernel is folded into `in`, as LoHa and non-Tucker LoKr store conv layers)."""
    if kind in ("conv", "dora"):
        return (s["up"][0], *s["down"][1:])
    if kind == "loha":
        if "hada_t1" in s:
            return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
        return (s["hada_w1_a"][0], *s["hada_w1_b"][1:])
    w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
    if "lokr_w2" in s:
        w2 = s["lokr_w2"]
    elif "lokr_t2" in s:
        w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1], *s["lokr_t2"][2:])
    else:
        w2 = (s["lokr_w2_a"][0], *s["lokr_w2_b"][1:])
    return tuple(a * b for a, b in zip(w1, w2)) + tuple(w2[len(w1):])


def check_shapes(path: str, module: str, info: VariantLayerInfo, base: tuple | None) -> None:
    """AdapterShapeError naming the file, module and keys unless the factors fit the base module
    (`base`: its weight shape, None when it is no Linear or Conv2d)."""
    keys = ", ".join(f"{info.keys[r]!r} {list(info.shapes[r])}" for r in info.keys if r != "alpha")
    if base is None:
        raise AdapterShapeError(f"{path}: module {module!r} is not a Linear or Conv2d of this base UNet ({keys})")
    s = info.shapes
    try:
        implied = _factor_shape(info.kind, s)
        ok = math.prod(implied) == math.prod(base) and implied[0] == base[0]
        if info.kind in ("conv", "dora"):
            ok = ok and tuple(implied) == base and s["down"][0] == s["up"][1] and tuple(s["up"][2:]) in ((), (1, 1))
            if info.kind == "dora":
                ok = ok and math.prod(s["magnitude"]) == base[0]
        elif info.kind == "loha":
            r = s["hada_w1_b"][0]
            ok = ok and s["hada_w2_b"][0] == r and all(len(s[k]) == 2 for k in ("hada_w1_a", "hada_w2_a"))
            ok = ok and s["hada_w1_a"] == s["hada_w2_a"] and s["hada_w1_b"] == s["hada_w2_b"]
            if "hada_t1" in s:
                ok = ok and s["hada_t1"] == s["hada_t2"] and tuple(s["hada_t1"][2:]) == tuple(base[2:])
        else:
            if "lokr_t2" in s:
                ok = ok and s["lokr_w2_a"][0] == s["lokr_w2_b"][0] == s["lokr_t2"][0] == s["lokr_t2"][1]
                ok = ok and tuple(s["lokr_t2"][2:]) == tuple(base[2:])
            elif "lokr_w2_a" in s:
                ok = ok and s["lokr_w2_a"][1] == s["lokr_w2_b"][0]
            if "lokr_w1_a" in s:
                ok = ok and s["lokr_w1_a"][1] == s["lokr_w1_b"][0] and len(s["lokr_w1_a"]) == 2
            else:
                ok = ok and len(s["lokr_w1"]) == 2
    except (KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        raise AdapterShapeError(f"{path}: module {module!r} has weight {list(base)} in this base model; the "
                                f"{info.kind} factors {keys} do not make it (made for another base model?)")


def validate(header, store) -> None:
    """Check a LoRA header's variants against the store's base UNet: shapes (check_shapes), and
    refuse them in compile mode, naming the keys and the reason."""
    if store.targets is not store.all_targets:
        shown = ", ".join(f"{v.keys[next(iter(v.keys))]!r} ({v.kind})" for v in list(header.variants.values())[:3])
        raise AdapterUnsupportedError(
            f"{header.path}: {len(header.variants)} module(s) hold LoCon / LoHa / LoKr / DoRA layers ({shown}, ...): "
            "compile mode's fixed LoRA pools serve only low-rank pairs on the attention projections; these layouts "
            "gather rows per adapter, a shape that changes with the batch (serve them without compile=)")
    modules = store.base_value("lora_variants.modules", lambda: dict(store.unet.named_modules()))
    for module, info in header.variants.items():
        check_shapes(header.path, module, info, weight_shape(modules.get(module)))


# ---------------------------------------------------------------------------------------------
# The math (reference; the hook below calls it).
# ---------------------------------------------------------------------------------------------


def _tucker(t, w_b, w_a):
    """einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a): [out, in, *k] from a Tucker core."""
    return torch.einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)


def delta_weight(layer: VariantLayer, shape: tuple) -> torch.Tensor:
    """Semantics: the dense dW of a LoHa / LoKr / conv layer at user scale 1, Shape `shape`
    (the base weight's), as the module docstring writes it."""
    t, c = layer.tensors, layer.scale
    if layer.kind == "full":
        return (c * t["diff"]).reshape(shape)
    if layer.kind in ("conv", "dora"):
        r = layer.rank
        return (c * (t["up"].reshape(-1, r) @ t["down"].reshape(r, -1))).reshape(shape)
    if layer.kind == "loha":
        if "hada_t1" in t:
            w = _tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"]) * _tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        else:
            w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return (c * w).reshape(shape)
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if len(shape) == 4 and w2.dim() == 2:  # conv kernel folded into w2's columns: [c, d*kh*kw]
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    return (c * torch.kron(w1.contiguous(), w2.contiguous())).reshape(shape)


def _op(module, x, w):
    if isinstance(module, torch.nn.Conv2d):
        return F.conv2d(x, w, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, w)


def _lora_out(module, x, t, c_s: float):
    """c_s * up(down(x)): down with the base op (its kernel, stride, padding), up as 1x1 / linear."""
    down, up = t["down"], t["up"]
    r = down.shape[0]
    if isinstance(module, torch.nn.Conv2d):
        h = _op(module, x, down.reshape(r, -1, *module.kernel_size))
        return c_s * F.conv2d(h, up.reshape(up.shape[0], r, 1, 1))
    return c_s * F.linear(F.linear(x, down.reshape(r, -1)), up.reshape(up.shape[0], r))


@dataclass
class VariantUse:
    """One adapter's variant on one module for the rows of a batch that name it."""

    layer: VariantLayer
    rows: torch.Tensor  # int64 [n]: the batch rows
    scales: torch.Tensor  # float [n]: each row's user scale
    gain: torch.Tensor | None = None  # DoRA: g = m / ||W0 + s c dW||, Shape [out]
    scale: float = 1.0  # DoRA: the one user scale of this use (its gain depends on it)


def dora_gain(module, layer: VariantLayer, scale: float) -> torch.Tensor:
    """Semantics: g = m / ||W0 + scale * c * (up @ down)||, the norm over every axis but `out`
    (PEFT's weight_norm, detached). Shape [out]."""
    w0 = module.weight.detach()
    w = w0 + scale * delta_weight(layer, tuple(w0.shape)).to(w0.dtype)
    norm = torch.linalg.norm(w.reshape(w.shape[0], -1), dim=1)
    return layer.tensors["magnitude"].reshape(-1).to(w0.dtype) / norm


def variant_tables(modules: dict, row_adapters, files: dict, device) -> dict:
    """{module: [VariantUse, ...]} for the rows of a batch: row r applies every (name, scale)
    of row_adapters[r] whose file has variants. DoRA uses are split per (adapter, scale) and
    their gains computed here, once per batch."""
    groups: dict = {}
    for r, row in enumerate(row_adapters):
        for name, scale in row:
            for module, layer in getattr(files[name], "variants", {}).items():
                key = (module, name, float(scale) if layer.kind == "dora" else None)
                groups.setdefault(key, (layer, [], []))
                groups[key][1].append(r)
                groups[key][2].append(float(scale))
    out: dict = {}
    for (module, _, dora_scale), (layer, rows, scales) in groups.items():
        m = modules[module]
        gain = dora_gain(m, layer, dora_scale) if layer.kind == "dora" else None
        use = VariantUse(layer, torch.tensor(rows, device=device), torch.tensor(scales, device=device), gain,
                         1.0 if dora_scale is None else dora_scale)
        out.setdefault(module, []).append(use)
    return out


def variant_delta(module, x: torch.Tensor, y0: torch.Tensor, uses: list[VariantUse]) -> torch.Tensor:
    """Semantics: the sum over `uses` of each use's per-row change of the module output (module
    docstring), as a tensor shaped like y0 (zeros on rows no use names).
    x: the module input, Shape [rows, ...]; y0: its base output, Shape [rows, ..., out] (Linear)
    or [rows, out, h, w] (Conv2d)."""
    delta = torch.zeros_like(y0)
    conv = isinstance(module, torch.nn.Conv2d)
    shape = tuple(module.weight.shape)
    for use in uses:
        layer, rows = use.layer, use.rows
        xs = x.index_select(0, rows)
        s = use.scales.to(y0.dtype).reshape(-1, *[1] * (y0.dim() - 1))
        if layer.kind in ("loha", "lokr"):
            d = s * _op(module, xs, delta_weight(layer, shape).to(x.dtype))
        elif layer.kind == "conv":
            d = s * _lora_out(module, xs, layer.tensors, layer.scale)
        elif layer.kind == "full":
            t = layer.tensors
            d = s * F.linear(xs, (layer.scale * t["diff"]).to(x.dtype),
                             None if t.get("diff_b") is None else (layer.scale * t["diff_b"]).to(x.dtype))
        else:  # dora: one scale per use
            g = use.gain.to(y0.dtype)
            g = g.reshape(-1, 1, 1) if conv else g
            base = y0.index_select(0, rows)
            if module.bias is not None:
                base = base - (module.bias.reshape(-1, 1, 1) if conv else module.bias)
            d = (g - 1) * base + g * _lora_out(module, xs, layer.tensors, layer.scale * use.scale)
        delta.index_add_(0, rows, d.to(delta.dtype))
    return delta
