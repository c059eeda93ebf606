"""Perfusion (key-locked rank-one editing): the math, the base model's C⁻¹, and the `rank1` file.

Paper: Tewel et al., SIGGRAPH 2023 (arXiv 2305.01644); research/methods.md §2. Per K and V
projection W [h, D] of every attn2 layer, token-wise on every text encoding e [D]:

    s(e) = i*ᵀ C⁻¹ e / (i*ᵀ C⁻¹ i*)                         # fp32; C⁻¹ symmetric
    h(e) = W e − s(e)·W i* + σ((s(e) − β)/τ)·o*             # = W e_⊥ + gate·o*

o*_K = W_K e_super (locked: the projection of the super-category word's encoding), o*_V is
learned, i* is an EMA of the concept token's encoding, C = E[e eᵀ] (uncentered) over captions.
Several concepts in one request (paper App. B, methods.md §2.4): with {u_j} a C⁻¹-orthonormal
basis of span{i*_j},

    e_⊥  = e − Σ_j u_j (u_jᵀ C⁻¹ e)
    h(e) = W e_⊥ + Σ_j σ((s_j(e) − β_j)/τ_j)·o*_j           # β, τ per concept

`perfusion_h` evaluates these equations directly (the ground truth of the tests);
`row_tensors` turns a request's concepts into the per-row operands of the kernel
`impasto.kernels.rank1_edit` (P_j = C⁻¹u_j, WU_j = W u_j, G_j = C⁻¹i*_j/(i*_jᵀC⁻¹i*_j), O_j = o*_j).

C⁻¹ belongs to a base model (its text encoder), not to a concept: it is stored under the
engine's adapter root as ``<adapter_root>/covariance/<fingerprint>.safetensors``, keyed by
`fingerprint(unet)`, never in the user's model folder. The `rank1` file format is documented in
docs/formats.md (`write_rank1` / `read_rank1`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from ..errors import AdapterError, AdapterFormatError, AdapterShapeError, AdapterValueError
from .files import DTYPE_NAMES, read_header, read_safetensors

FAMILY = "rank1"
FORMAT_VERSION = "1"
COVARIANCE_FAMILY = "rank1-covariance"
COVARIANCE_DIR = "covariance"

# Metadata keys of a rank1 file (all str -> str, as safetensors stores them).
META_FAMILY = "impasto.family"
META_VERSION = "impasto.format_version"
META_PLACEHOLDER = "impasto.placeholder"
META_SUPER_WORD = "impasto.super_word"
META_BETA = "impasto.beta"
META_TAU = "impasto.tau"
META_FINGERPRINT = "impasto.fingerprint"
REQUIRED_METADATA = (META_FAMILY, META_VERSION, META_PLACEHOLDER, META_SUPER_WORD, META_BETA, META_TAU, META_FINGERPRINT)

# Tensor keys: one i* and one token embedding per file, o*_K and o*_V per attn2 module.
KEY_I_STAR = "i_star"
KEY_EMBEDDING = "token_embedding"
SUFFIX_K = ".to_k.o_star"
SUFFIX_V = ".to_v.o_star"

FINGERPRINT_CHARS = 16

# Inference defaults (methods.md §2.1): β 0.6-0.75 for local key-lock, τ 0.15.
DEFAULT_BETA = 0.7
DEFAULT_TAU = 0.15


# ----------------------------------------------------------------------------------------------
# The math
# ----------------------------------------------------------------------------------------------


def perfusion_basis(i_stars: torch.Tensor, C_inv: torch.Tensor) -> torch.Tensor:
    """A C⁻¹-orthonormal basis {u_j} of span{i*_j} (paper App. B; methods.md §2.4).

    Semantics: Cholesky C⁻¹ = Uᵀ U (U upper triangular); Q R = [U i*_1 … U i*_J] (reduced QR);
    u_j = U⁻¹ q_j. Then u_jᵀ C⁻¹ u_k = q_jᵀ q_k = δ_jk and span{u} = span{i*}. For J = 1 this is
    ±i* / sqrt(i*ᵀ C⁻¹ i*). Computed in fp64, returned in i_stars' dtype.

    Args:
      i_stars: Shape: `[J, D]`, linearly independent.
      C_inv: Shape: `[D, D]`, symmetric positive definite.
    Returns: Shape: `[J, D]`, the u_j as rows.
    """
    if i_stars.dim() != 2 or C_inv.shape != (i_stars.shape[1], i_stars.shape[1]):
        raise ValueError(f"i_stars must be [J, D] and C_inv [D, D], got {tuple(i_stars.shape)}, {tuple(C_inv.shape)}")
    Ci = C_inv.double()
    L = torch.linalg.cholesky((Ci + Ci.T) / 2)  # C⁻¹ = L Lᵀ, so U = Lᵀ
    A = L.T @ i_stars.double().T  # [D, J]: columns U i*_j
    Q, R = torch.linalg.qr(A)  # Q [D, J]
    if bool((R.diagonal().abs() <= 1e-12 * R.diagonal().abs().max()).any()):
        raise ValueError("the concepts' i* are linearly dependent: no basis of their span has J vectors")
    u = torch.linalg.solve_triangular(L.T, Q, upper=True)  # U u_j = q_j, [D, J]
    return u.T.to(i_stars.dtype)


def perfusion_h(e, W, i_stars, o_stars, betas, taus, C_inv, *, gate=None) -> torch.Tensor:
    """h(e) for one projection, straight from the paper's equations, in fp64.

    Semantics: J = 1: h = W e − s(e)·W i* + gate(s(e), β, τ)·o* (paper eq.);
    J > 1: h = W e_⊥ + Σ_j gate(s_j(e), β_j, τ_j)·o*_j with e_⊥ from `perfusion_basis`
    (App. B). gate defaults to σ((s − β)/τ); tests replace it (e.g. by s, giving ROME).

    Args:
      e: Shape: `[..., D]`. W: Shape: `[N, D]`. i_stars: Shape: `[J, D]`. o_stars: Shape: `[J, N]`.
      betas, taus: J floats (or a tensor [J]). C_inv: Shape: `[D, D]`.
    Returns: Shape: `[..., N]`, float64.
    """
    if gate is None:
        gate = lambda s, beta, tau: torch.sigmoid((s - beta) / tau)  # noqa: E731
    e, W, I, O, Ci = (t.double() for t in (e, W, i_stars, o_stars, C_inv))
    betas = [float(b) for b in betas]
    taus = [float(t) for t in taus]
    # s_j(e) = i*_jᵀ C⁻¹ e / (i*_jᵀ C⁻¹ i*_j)
    s = (e @ Ci @ I.T) / torch.einsum("jd,de,je->j", I, Ci, I)  # [..., J]
    if I.shape[0] == 1:
        h = e @ W.T - s[..., :1] * (W @ I[0])
    else:
        u = perfusion_basis(I, Ci)  # [J, D]
        e_perp = e - (e @ Ci @ u.T) @ u  # e − Σ_j u_j (u_jᵀ C⁻¹ e)
        h = e_perp @ W.T
    for j in range(I.shape[0]):
        h = h + gate(s[..., j : j + 1], betas[j], taus[j]) * O[j]
    return h


class Concept(NamedTuple):
    """One concept as one projection sees it."""

    i_star: torch.Tensor  # [D]
    o_star: torch.Tensor  # [N]: o*_K (= W_K e_super) or o*_V of this layer
    beta: float
    tau: float


class Rank1Row(NamedTuple):
    """One row's operands of `impasto.kernels.rank1_edit` for one projection (M slots)."""

    P: torch.Tensor  # [M, D]  C⁻¹ u_j
    WU: torch.Tensor  # [M, N]  W u_j
    G: torch.Tensor  # [M, D]  C⁻¹ i*_j / (i*_jᵀ C⁻¹ i*_j)
    O: torch.Tensor  # [M, N]  o*_j
    beta: torch.Tensor  # [M] float32
    tau: torch.Tensor  # [M] float32


def row_tensors(W, concepts: Sequence[Concept], C_inv, *, slots: int | None = None, basis=None, dtype=torch.float32) -> Rank1Row:
    """The kernel operands of one row of one projection W [N, D] for `concepts`, padded to `slots`.

    Semantics: u = perfusion_basis(i*s, C⁻¹) (or `basis`, the same for every layer of a request);
    P_j = C⁻¹ u_j, WU_j = W u_j, G_j = C⁻¹ i*_j / (i*_jᵀ C⁻¹ i*_j), O_j = o*_j, β_j, τ_j for
    j < J; slots j >= J are unused: P, WU, G, O zero, β 0, τ 1 (they contribute exactly zero).
    Computed in fp64, returned in `dtype` (β, τ float32). O keeps autograd (training's o*), the
    others are constants of the concepts' i*, C⁻¹ and W.
    """
    J = len(concepts)
    M = J if slots is None else slots
    if M < J:
        raise ValueError(f"{J} concepts do not fit {M} slots")
    N, D = W.shape
    P = torch.zeros(M, D, dtype=torch.float64)
    G = torch.zeros(M, D, dtype=torch.float64)
    WU = torch.zeros(M, N, dtype=torch.float64)
    O = torch.zeros(M, N, dtype=torch.float64)
    beta = torch.zeros(M, dtype=torch.float32)
    tau = torch.ones(M, dtype=torch.float32)
    if J:
        I = torch.stack([c.i_star for c in concepts]).double().cpu()  # [J, D]
        Ci = C_inv.double().cpu()
        u = (perfusion_basis(I, Ci) if basis is None else basis).double().cpu()
        Wd = W.detach().double().cpu()
        P[:J] = u @ Ci
        WU[:J] = u @ Wd.T
        G[:J] = (I @ Ci) / torch.einsum("jd,de,je->j", I, Ci, I)[:, None]
        # not detached: o* may be a trained Parameter (impasto.train.perfusion); exact fp32 <-> fp64
        O[:J] = torch.stack([c.o_star for c in concepts]).double().cpu()
        beta[:J] = torch.tensor([float(c.beta) for c in concepts])
        tau[:J] = torch.tensor([float(c.tau) for c in concepts])
    dev = W.device
    return Rank1Row(*(t.to(dev, dtype) for t in (P, WU, G, O)), beta.to(dev), tau.to(dev))


# ----------------------------------------------------------------------------------------------
# The base model's C⁻¹
# ----------------------------------------------------------------------------------------------


def attn2_projections(unet: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{attn2 module name: (to_k.weight, to_v.weight)} in `unet.named_modules()` order."""
    out = {}
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] == "attn2" and hasattr(module, "to_k") and hasattr(module, "to_v"):
            out[name] = (module.to_k.weight, module.to_v.weight)
    return out


def base_shapes(unet: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{attn2 module name: (to_k.weight shape, to_v.weight shape)}, for `read_rank1`."""
    return {n: (tuple(k.shape), tuple(v.shape)) for n, (k, v) in attn2_projections(unet).items()}


def fingerprint(unet: torch.nn.Module) -> str:
    """The base model's identity for C⁻¹ and rank1 files: 16 hex characters.

    Semantics: sha256 over, for every attn2 module in `unet.named_modules()` order, the bytes of
    to_k.weight then to_v.weight, each cast to float32, C-contiguous, little-endian; the first 16
    hex characters. The same weights loaded in fp16 hash differently (they are different numbers).
    """
    h = hashlib.sha256()
    projections = attn2_projections(unet)
    if not projections:
        raise AdapterError("the UNet has no attn2 module with to_k/to_v: not a Stable-Diffusion layout")
    for k, v in projections.values():
        for w in (k, v):
            h.update(w.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()[:FINGERPRINT_CHARS]


@torch.no_grad()
def compute_covariance(tokenizer, text_encoder, captions: Iterable[str], *, batch_size: int = 64) -> torch.Tensor:
    """C = uncentered second moment of the text encodings, fp64 [D, D].

    Semantics (ChenDarYen's data/estimate_C_inv.py): each caption is tokenized with
    padding="max_length" (77) and truncation; e = text_encoder(ids)[0] (last hidden state);
        C = (1 / #captions) · Σ_captions Σ_{t < 77} e_t e_tᵀ
    i.e. all 77 positions, BOS and padding included, divided by the number of captions (not of
    tokens; s(e) is invariant to scaling C, not to its shape). Accumulated in fp64.
    """
    captions = list(captions)
    if not captions:
        raise ValueError("compute_covariance needs at least one caption")
    device = next(text_encoder.parameters()).device
    C = None
    for i in range(0, len(captions), batch_size):
        ids = tokenizer(
            captions[i : i + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        e = text_encoder(ids)[0].double().flatten(0, 1)  # [B * 77, D]
        part = e.T @ e
        C = part if C is None else C + part
    return (C / len(captions)).cpu()


def inverse_covariance(C: torch.Tensor) -> torch.Tensor:
    """C⁻¹ in fp64, symmetrized."""
    Ci = torch.linalg.inv(C.double())
    return (Ci + Ci.T) / 2


def covariance_path(adapter_root, fp: str) -> Path:
    """Where the C⁻¹ of the base model with fingerprint `fp` lives: <root>/covariance/<fp>.safetensors."""
    if len(fp) != FINGERPRINT_CHARS or any(ch not in "0123456789abcdef" for ch in fp):
        raise ValueError(f"fingerprint must be {FINGERPRINT_CHARS} lowercase hex characters, got {fp!r}")
    return Path(adapter_root) / COVARIANCE_DIR / f"{fp}.safetensors"


def save_covariance(adapter_root, fp: str, C_inv: torch.Tensor, *, num_captions: int, model_dir=None) -> Path:
    """Write C⁻¹ (fp32) for base `fp` under the adapter root; returns the path.

    model_dir: the base model's folder, if known: writing inside it is refused (C⁻¹ is engine
    state, the user's model folder is read-only to impasto).
    """
    path = covariance_path(adapter_root, fp)
    if model_dir is not None:
        root = Path(model_dir).resolve()
        if path.resolve() == root or root in path.resolve().parents:
            raise AdapterError(f"{path}: refusing to write C⁻¹ into the model folder {model_dir}; use an adapter root outside it")
    if C_inv.dim() != 2 or C_inv.shape[0] != C_inv.shape[1]:
        raise AdapterShapeError(f"{path}: C_inv must be square [D, D], got {tuple(C_inv.shape)}")
    if not bool(torch.isfinite(C_inv).all()):
        raise AdapterValueError(f"{path}: C_inv holds NaN or Inf")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    metadata = {
        META_FAMILY: COVARIANCE_FAMILY,
        META_VERSION: FORMAT_VERSION,
        META_FINGERPRINT: fp,
        "impasto.num_captions": str(int(num_captions)),
        "impasto.normalization": "sum over captions and all 77 positions of e e^T, divided by the number of captions",
    }
    save_file({"C_inv": C_inv.detach().to("cpu", torch.float32).contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_covariance(adapter_root, fp: str, *, dim: int | None = None) -> torch.Tensor:
    """C⁻¹ (fp32 [D, D]) of base `fp`; `dim` (the text encoder width) is checked when given."""
    path = covariance_path(adapter_root, fp)
    if not path.is_file():
        raise AdapterError(f"{path}: no C⁻¹ for base model {fp}; compute it with compute_covariance + save_covariance")
    metadata, tensors = read_safetensors(path)
    for key in (META_FAMILY, META_FINGERPRINT):
        if key not in metadata:
            raise AdapterFormatError(f"{path}: metadata key {key!r} is missing")
    if metadata[META_FAMILY] != COVARIANCE_FAMILY:
        raise AdapterFormatError(f"{path}: {META_FAMILY} is {metadata[META_FAMILY]!r}, expected {COVARIANCE_FAMILY!r}")
    if metadata[META_FINGERPRINT] != fp:
        raise AdapterShapeError(f"{path}: {META_FINGERPRINT} is {metadata[META_FINGERPRINT]!r}: made for another base model than {fp}")
    if set(tensors) != {"C_inv"}:
        raise AdapterFormatError(f"{path}: expected exactly the key 'C_inv', got {sorted(tensors)}")
    C_inv = tensors["C_inv"]
    _check_values(path, "C_inv", C_inv)
    if C_inv.dim() != 2 or C_inv.shape[0] != C_inv.shape[1] or (dim is not None and C_inv.shape[0] != dim):
        want = f"[{dim}, {dim}]" if dim is not None else "square"
        raise AdapterShapeError(f"{path}: key 'C_inv' has shape {tuple(C_inv.shape)}, expected {want}")
    return C_inv


# ----------------------------------------------------------------------------------------------
# The rank1 file
# ----------------------------------------------------------------------------------------------


@dataclass
class Rank1File:
    """A rank1 adapter as read from disk (every tensor fp32, CPU)."""

    path: str
    # attn2 module -> (o*_K [h], o*_V [h]); in the base's module order when read against a base
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    i_star: torch.Tensor  # [D]
    token_embedding: torch.Tensor  # [D_emb]
    placeholder: str
    super_word: str
    beta: float
    tau: float
    fingerprint: str
    format_version: str


@dataclass
class Rank1Header:
    """The metadata of a rank1 file, and its tensors' shapes (no tensor data read)."""

    path: str
    placeholder: str
    super_word: str
    beta: float
    tau: float
    fingerprint: str
    format_version: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


def write_rank1(
    path,
    *,
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    i_star: torch.Tensor,
    token_embedding: torch.Tensor,
    placeholder: str,
    super_word: str,
    beta: float,
    tau: float,
    fingerprint: str,
) -> None:
    """Write one concept as a rank1 file (safetensors, fp32); see docs/formats.md."""
    path = str(path)
    if not layers:
        raise AdapterFormatError(f"{path}: a rank1 file needs at least one attn2 layer")
    if not placeholder or not super_word:
        raise AdapterFormatError(f"{path}: placeholder and super_word must be non-empty")
    _check_gate(path, float(beta), float(tau))
    tensors = {KEY_I_STAR: i_star, KEY_EMBEDDING: token_embedding}
    for name, (o_k, o_v) in layers.items():
        tensors[name + SUFFIX_K] = o_k
        tensors[name + SUFFIX_V] = o_v
    out = {}
    for key, t in tensors.items():
        if t.dim() != 1:
            raise AdapterShapeError(f"{path}: key {key!r} must be a vector, got shape {tuple(t.shape)}")
        t = t.detach().to("cpu", torch.float32).contiguous()
        _check_values(path, key, t)
        out[key] = t
    _check_dims(path, out)
    metadata = {
        META_FAMILY: FAMILY,
        META_VERSION: FORMAT_VERSION,
        META_PLACEHOLDER: placeholder,
        META_SUPER_WORD: super_word,
        META_BETA: repr(float(beta)),
        META_TAU: repr(float(tau)),
        META_FINGERPRINT: fingerprint,
    }
    save_file(out, path, metadata=metadata)


def read_rank1_header(path) -> Rank1Header:
    """The metadata and tensor shapes of a rank1 file, checked; no tensor data is read."""
    path = str(path)
    header = read_header(path)
    return _check_header(path, header.metadata, header.shapes, header.dtypes)


def _check_header(path: str, metadata: dict, shapes: dict, dtypes: dict) -> Rank1Header:
    for key in REQUIRED_METADATA:
        if key not in metadata:
            raise AdapterFormatError(f"{path}: metadata key {key!r} is missing")
    if metadata[META_FAMILY] != FAMILY:
        raise AdapterFormatError(f"{path}: metadata {META_FAMILY} is {metadata[META_FAMILY]!r}, expected {FAMILY!r}")
    if metadata[META_VERSION] != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{path}: metadata {META_VERSION} is {metadata[META_VERSION]!r}; this impasto reads version {FORMAT_VERSION}"
        )
    for key in (META_PLACEHOLDER, META_SUPER_WORD, META_FINGERPRINT):
        if not metadata[key]:
            raise AdapterFormatError(f"{path}: metadata {key} is empty")
    gate = {}
    for key in (META_BETA, META_TAU):
        try:
            gate[key] = float(metadata[key])
        except ValueError:
            raise AdapterFormatError(f"{path}: metadata {key} is {metadata[key]!r}, not a number") from None
    _check_gate(path, gate[META_BETA], gate[META_TAU])
    for key in (KEY_I_STAR, KEY_EMBEDDING):
        if key not in shapes:
            raise AdapterFormatError(f"{path}: key {key!r} is missing")
    modules = {}
    for key in shapes:
        if key in (KEY_I_STAR, KEY_EMBEDDING):
            continue
        for i, suffix in enumerate((SUFFIX_K, SUFFIX_V)):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], [None, None])[i] = key
                break
        else:
            raise AdapterFormatError(f"{path}: unknown key {key!r}: not i_star, token_embedding or <attn2>{SUFFIX_K}/{SUFFIX_V}")
    if not modules:
        raise AdapterFormatError(f"{path}: no layer keys (<attn2 module>{SUFFIX_K} / {SUFFIX_V})")
    for module, (k, v) in modules.items():
        if k is None or v is None:
            missing = module + (SUFFIX_K if k is None else SUFFIX_V)
            raise AdapterFormatError(f"{path}: key {missing!r} is missing (the layer has only one of o*_K, o*_V)")
    for key, dtype in dtypes.items():
        if dtype != "F32":
            raise AdapterValueError(f"{path}: key {key!r} has dtype {dtype}, rank1 files store float32 (F32)")
    for key, shape in shapes.items():
        if len(shape) != 1:
            raise AdapterShapeError(f"{path}: key {key!r} must be a vector, got shape {shape}")
    _check_dims(path, shapes)
    return Rank1Header(
        path=path,
        placeholder=metadata[META_PLACEHOLDER],
        super_word=metadata[META_SUPER_WORD],
        beta=gate[META_BETA],
        tau=gate[META_TAU],
        fingerprint=metadata[META_FINGERPRINT],
        format_version=metadata[META_VERSION],
        shapes=shapes,
        dtypes=dtypes,
    )


def read_rank1(
    path,
    *,
    base_shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    fingerprint: str | None = None,
    embedding_dim: int | None = None,
) -> Rank1File:
    """Read and check a rank1 file, optionally against a base model.

    base_shapes: {attn2 module: (to_k.weight shape, to_v.weight shape)} of the base
      (`base_shapes(unet)`): the file must cover exactly these modules, with o*_K of length
      to_k's out features, o*_V of to_v's, and i* of their in features (AdapterShapeError).
    fingerprint: the base's `fingerprint(unet)`; a different one in the file is refused
      ("made for another base model", AdapterShapeError).
    embedding_dim: the text encoder's token-embedding width, checked against token_embedding.
    """
    path = str(path)
    metadata, tensors = read_safetensors(path)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    dtypes = {k: DTYPE_NAMES.get(t.dtype, str(t.dtype)) for k, t in tensors.items()}
    header = _check_header(path, metadata, shapes, dtypes)
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise AdapterShapeError(
            f"{path}: metadata {META_FINGERPRINT} is {header.fingerprint!r}, this base model is {fingerprint!r}: "
            "made for another base model"
        )
    D = header.shapes[KEY_I_STAR][0]
    if embedding_dim is not None and header.shapes[KEY_EMBEDDING][0] != embedding_dim:
        raise AdapterShapeError(
            f"{path}: key {KEY_EMBEDDING!r} has {header.shapes[KEY_EMBEDDING][0]} values, the base's token embedding {embedding_dim}"
        )
    modules = [k[: -len(SUFFIX_K)] for k in header.shapes if k.endswith(SUFFIX_K)]
    if base_shapes is not None:
        missing = [m for m in base_shapes if m not in modules]
        extra = [m for m in modules if m not in base_shapes]
        if missing:
            raise AdapterShapeError(f"{path}: the base has attn2 layer {missing[0]!r} ({len(missing)} in all) that the file lacks")
        if extra:
            raise AdapterShapeError(f"{path}: key {extra[0] + SUFFIX_K!r} names no attn2 layer of the base")
        for module, (k_shape, v_shape) in base_shapes.items():
            for suffix, w_shape, proj in ((SUFFIX_K, k_shape, "to_k"), (SUFFIX_V, v_shape, "to_v")):
                n = header.shapes[module + suffix][0]
                if n != w_shape[0]:
                    raise AdapterShapeError(f"{path}: key {module + suffix!r} has {n} values, the base's {module}.{proj} outputs {w_shape[0]}")
                if w_shape[1] != D:
                    raise AdapterShapeError(f"{path}: key {KEY_I_STAR!r} has {D} values, the base's {module}.{proj} takes {w_shape[1]}")
    if not bool(torch.isfinite(torch.cat(list(tensors.values()))).all()):  # one check; find the key if it fails
        for key, t in tensors.items():
            _check_values(path, key, t)
    if not bool(tensors[KEY_I_STAR].abs().max() > 0):  # Perfusion's basis normalizes i*: it cannot be 0
        raise AdapterValueError(f"{path}: key {KEY_I_STAR!r} is all zeros (a concept's i* must be a non-zero encoding)")
    if base_shapes is not None:
        modules = list(base_shapes)  # the base's module order (safetensors sorts its keys)
    layers = {m: (tensors[m + SUFFIX_K], tensors[m + SUFFIX_V]) for m in modules}
    return Rank1File(
        path=path,
        layers=layers,
        i_star=tensors[KEY_I_STAR],
        token_embedding=tensors[KEY_EMBEDDING],
        placeholder=header.placeholder,
        super_word=header.super_word,
        beta=header.beta,
        tau=header.tau,
        fingerprint=header.fingerprint,
        format_version=header.format_version,
    )


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_values(path, key: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise AdapterValueError(f"{path}: key {key!r} has dtype {str(t.dtype).removeprefix('torch.')}, expected float32")
    if not bool(torch.isfinite(t).all()):
        raise AdapterValueError(f"{path}: key {key!r} holds NaN or Inf")


def _check_gate(path, beta: float, tau: float) -> None:
    if not math.isfinite(beta):
        raise AdapterValueError(f"{path}: {META_BETA} is {beta}, must be finite")
    if not (math.isfinite(tau) and tau > 0):
        raise AdapterValueError(f"{path}: {META_TAU} is {tau}, must be finite and > 0")


def _check_dims(path, shapes) -> None:
    """o*_K and o*_V of one layer have one length; the file is internally consistent."""
    def n(x):
        return x.shape[0] if isinstance(x, torch.Tensor) else x[0]

    for key in shapes:
        if key.endswith(SUFFIX_K):
            module = key[: -len(SUFFIX_K)]
            if n(shapes[key]) != n(shapes[module + SUFFIX_V]):
                raise AdapterShapeError(
                    f"{path}: keys {key!r} ({n(shapes[key])}) and {module + SUFFIX_V!r} ({n(shapes[module + SUFFIX_V])}) differ in length"
                )
