"""The `rank1` family (Perfusion): key-locked gated rank-1 edits of every attn2 K and V, a
learned token, and optional global key locking (rank1.py holds the math and the file).

Per branch row with concepts j (C⁻¹-orthonormal basis u_j of their i*), on the base projection W:

    h(e) = W e_⊥ + Σ_j σ((s_j(e) − β_j)/τ_j)·o*_j      (impasto.kernels.rank1_edit)

β and τ come from the request (options beta, tau) or the file; a concept is not scaled.
With global_lock=True the K pathway reads the prompt with the placeholder replaced by the
concept's super-category word (Perfusion §2.1, inference only).

Positions: the edit is applied only at each chunk's BOS and tokens (and its EOS if EDIT_EOS),
never at the padding after the EOS, where K and V stay W e. Why: o* here is one vector per layer (the paper's
parameterization), so wherever the gate opens it writes the concept's value; CLIP's causal
attention carries the placeholder's trained row into every later position, and with a grown row
the ≈ 60 padding positions open the gate together and the concept's value floods every pixel
(docs/training.md, "Perfusion"). The community code edits all 77 positions, but ChenDarYen's o* are
per position ([77, h], each padding position its own trained output), lucidrains' was never
trained end to end. Training (impasto.train.perfusion) goes through this same code, so it learns
with the same positions it is served with.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from impasto.kernels import rank1_edit

from ...api import AdapterInfo
from ...errors import AdapterShapeError, RequestError
from ...prompts import CHUNK
from .. import rank1 as rank1_format
from . import FAMILY_KEY, Family

OPTIONS = ("beta", "tau", "global_lock")

# Whether each chunk's EOS is edited along with the prompt's tokens (the padding after it never
# is). False, by measurement on the validation split: the trained i* is close to the EOS's
# encoding (s ≈ 0.5-0.6 for the arrow), so an edited EOS opens the gate there too and costs the
# prompt (docs/training.md, "Perfusion", "Which positions are edited").
EDIT_EOS = False
CHUNK_POSITIONS = CHUNK + 2  # BOS, 75 tokens, EOS: the plan's keys come in chunks of 77


def base_shapes(store) -> dict:
    """attn2 K/V weight shapes of the (frozen) base, walked once per store: every rank1 read needs them."""
    return store.base_value("rank1.shapes", lambda: rank1_format.base_shapes(store.unet))


class Rank1Family(Family):
    name = "rank1"
    kv_positions = True  # the edit stays off the padding (module docstring)

    def detect(self, path, metadata) -> bool:
        return metadata.get(FAMILY_KEY) == rank1_format.FAMILY

    def register(self, store, name, path, *, suffix, token) -> AdapterInfo:
        header = rank1_format.read_rank1_header(path)
        if header.fingerprint != store.fingerprint:
            raise AdapterShapeError(
                f"{path}: made for another base model (fingerprint {header.fingerprint}, this base is {store.fingerprint})"
            )
        shapes = base_shapes(store)
        layers = {k[: -len(rank1_format.SUFFIX_K)] for k in header.shapes if k.endswith(rank1_format.SUFFIX_K)}
        if layers != set(shapes):
            missing = sorted(set(shapes) - layers) or sorted(layers - set(shapes))
            raise AdapterShapeError(f"{path}: attn2 layers differ from this base model's (e.g. {missing[0]!r})")
        for layer, (k_shape, v_shape) in shapes.items():
            got = (header.shapes[layer + rank1_format.SUFFIX_K], header.shapes[layer + rank1_format.SUFFIX_V])
            if got != ((k_shape[0],), (v_shape[0],)):
                raise AdapterShapeError(f"{path}: layer {layer!r} has o* lengths {got}, this base needs {k_shape[0]}, {v_shape[0]}")
        width = {k[1] for k, _ in shapes.values()}  # the text width every attn2 K/V reads
        i_star = header.shapes[rank1_format.KEY_I_STAR]
        if (i_star[0],) != tuple(width) or len(width) != 1:
            raise AdapterShapeError(f"{path}: i_star has shape {i_star}, this base needs {tuple(width)}")
        embedding = header.shapes[rank1_format.KEY_EMBEDDING]
        if embedding != i_star:  # the token embedding is a row of the text encoder's table, as wide as i*
            raise AdapterShapeError(f"{path}: token_embedding has shape {embedding}, this base needs {i_star}")
        return AdapterInfo(
            name=name,
            path=path,
            family=self.name,
            format="impasto-rank1",
            rank=1,
            targets=tuple(shapes),
            nbytes=sum(4 * s[0] for s in header.shapes.values()),
            token=token or header.placeholder,
            suffix=suffix,
            fingerprint=header.fingerprint,
            token_map=((token or header.placeholder, header.placeholder),),
        )

    def load(self, store, info) -> rank1_format.Rank1File:
        return rank1_format.read_rank1(info.path, base_shapes=base_shapes(store), fingerprint=store.fingerprint)

    def check_use(self, adapter, info) -> None:
        where = f"adapters: {adapter.name!r}"
        if adapter.scale != 1.0:
            raise RequestError(f"{where} is a rank1 (Perfusion) adapter: tune it with beta and tau, not a scale "
                               f"(got {adapter.scale})")
        unknown = set(adapter.options) - set(OPTIONS)
        if unknown:
            raise RequestError(f"{where}: unknown rank1 options {sorted(unknown)}")
        for option in ("beta", "tau"):
            value = adapter.options.get(option)
            # bool is an int to Python, and "0.5" would reach float() in the plan: both refused here
            if option in adapter.options and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                              or not math.isfinite(value)):
                raise RequestError(f"{where}: option {option} must be a finite real number, got {value!r}")
        if "tau" in adapter.options and not adapter.options["tau"] > 0:
            raise RequestError(f"{where}: tau must be > 0, got {adapter.options['tau']}")
        if not isinstance(adapter.options.get("global_lock", False), bool):
            raise RequestError(f"{where}: option global_lock must be True or False, got {adapter.options['global_lock']!r}")

    def tokens(self, info, file) -> dict:
        return {info.token: file.token_embedding}

    def key_text(self, text, use) -> str:
        if use.options.get("global_lock"):
            return text.replace(use.info.token, use.file.super_word)
        return text

    def kv_edit(self, store, rows, positions=None):
        concepts = [[(use.file, use.options) for use in row] for row in rows]
        C_inv = store.covariance()
        # the C⁻¹-orthonormal basis of a row's i* is the same in every layer: computed once per plan
        bases = [rank1_format.perfusion_basis(torch.stack([f.i_star for f, _ in con]).double(), C_inv.double())
                 if con else None for con in concepts]
        masks = None if positions is None else tuple(edited_positions(m) for m in positions)
        return functools.partial(_edit, concepts=concepts, bases=bases, C_inv=C_inv, masks=masks)


def edited_positions(text: torch.Tensor, edit_eos: bool | None = None) -> torch.Tensor:
    """Semantics: the positions the edit applies to, from the text positions (Shape [U, L] bool,
    True at BOS, tokens and EOS of every chunk): all of them, or without each chunk's EOS (the last
    True of every run of Trues) when edit_eos is False (None: EDIT_EOS). Shape [U, L] bool."""
    edit_eos = EDIT_EOS if edit_eos is None else edit_eos
    if edit_eos:
        return text
    # per 77-position chunk: a full chunk's EOS is its last position, followed by the next BOS
    chunks = text.reshape(text.shape[0], -1, CHUNK_POSITIONS)
    after = torch.cat([chunks[..., 1:], torch.zeros_like(chunks[..., :1])], dim=-1)
    return (chunks & after).reshape(text.shape)


def _edit(layer: str, attn, k, v, key_embeds, embeds, *, concepts, bases, C_inv, masks=None):
    """Semantics: k = h_K(key_embeds), v = h_V(embeds) with every row's concepts, as
    `rank1_format.perfusion_h` on W = attn.to_k.weight / attn.to_v.weight, added to `k`, `v`,
    at the positions masks = (value mask, key mask) allow (Shape [U, L] bool each; None: all);
    elsewhere k, v are unchanged. k, v: Shape [U, L, h]; key_embeds, embeds: Shape [U, L, D]."""
    k = _apply(k, key_embeds, attn.to_k.weight, layer, 0, concepts, bases, C_inv, None if masks is None else masks[1])
    v = _apply(v, embeds, attn.to_v.weight, layer, 1, concepts, bases, C_inv, None if masks is None else masks[0])
    return k, v


def _apply(out, e, W, layer: str, which: int, concepts: list, bases: list, C_inv, mask=None):
    """Every row's concepts on one projection's output (which: 0 = K, 1 = V), padded to the
    widest row's concept count (empty slots contribute exactly zero); kept to `mask`'s positions
    (the kernel runs on every position, its result is discarded at the others: the kernel's
    schema stays one per-row edit, and the plan runs once per request)."""
    M = max(len(c) for c in concepts)
    rows = []
    for con, basis in zip(concepts, bases):
        cs = [
            rank1_format.Concept(f.i_star, f.layers[layer][which], float(opt.get("beta", f.beta)),
                                 float(opt.get("tau", f.tau)))
            for f, opt in con
        ]
        rows.append(rank1_format.row_tensors(W, cs, C_inv, slots=M, basis=basis, dtype=torch.float32))
    P, WU, G, O, beta, tau = (torch.stack(t) for t in zip(*rows))
    edited = rank1_edit(out, e, P, WU, G, O, beta, tau)
    return edited if mask is None else torch.where(mask[..., None], edited, out)
