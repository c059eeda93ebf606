"""Perfusion's math (paper equations vs the kernel path), the base model's C⁻¹, the rank1 file.

Every math property is checked twice: through `perfusion_h` (the paper's equations, fp64) and
through the engine's kernel path (`row_tensors` + `rank1_edit`, fp64 on the reference backend
and fp32 on Triton), and the two must agree.
"""

import hashlib
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from impasto.adapters import rank1 as R
from impasto.errors import AdapterError, AdapterFormatError, AdapterShapeError, AdapterValueError
from impasto.kernels import rank1_edit
from impasto.kernels.testing import assert_close

D, N = 24, 20
# β and τ exactly representable in float32 (the kernel takes them as float32)
BETAS = [0.5, 0.625, 0.75]
TAUS = [0.125, 0.25, 0.15625]


@pytest.fixture(scope="module")
def world():
    """An anisotropic uncentered C (so C⁻¹ is not a multiple of I), W_K, W_V, three concepts."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64)
    enc = torch.randn(500, D, generator=g, dtype=torch.float64) @ mix + 0.3  # uncentered
    C = enc.T @ enc / 500
    return dict(
        C_inv=R.inverse_covariance(C),
        W_k=torch.randn(N, D, generator=g, dtype=torch.float64) / D**0.5,
        W_v=torch.randn(N, D, generator=g, dtype=torch.float64) / D**0.5,
        i_stars=enc[:3].clone(),
        e_super=enc[3].clone(),
        o_v=torch.randn(3, N, generator=g, dtype=torch.float64),
        e=enc[10:27].clone(),  # [T=17, D] encodings of a prompt
    )


def _s(e, i_star, C_inv):
    return (e @ C_inv @ i_star) / (i_star @ C_inv @ i_star)


def kernel_h(e, W, concepts, C_inv, backend, *, slots=None, extra=None, dtype=None):
    """h(e) [T, N] through row_tensors + rank1_edit (one row); fp64 on reference, fp32 on triton.

    extra: an optional (P, WU, G, O) slot appended to the row (beta 0, tau 1)."""
    dt = dtype or (torch.float64 if backend == "reference" else torch.float32)
    row = R.row_tensors(W, concepts, C_inv, slots=slots, dtype=dt)
    P, WU, G, O, beta, tau = row
    if extra is not None:
        P, WU, G, O = (torch.cat([a, b.to(dt)[None]]) for a, b in zip((P, WU, G, O), extra))
        beta, tau = torch.cat([beta, torch.zeros(1)]), torch.cat([tau, torch.ones(1)])
    ed = e.to(dt)
    base = ed @ W.to(dt).T
    out = rank1_edit(base[None], ed[None], P[None], WU[None], G[None], O[None], beta[None], tau[None], backend=backend)
    return out[0]


def check(got, expected, backend, lowp=None, msg=""):
    """fp64 reference backend: within 1e-9 of the equations; triton (fp32): fp32 tolerances, or
    twice the error of the same kernel path computed by PyTorch in fp32 (`lowp`)."""
    if backend == "reference":
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=msg)
    else:
        assert_close(got, expected, lowp=lowp, msg=msg)


def both(backend, *args, **kw):
    """(kernel path on `backend`, the same path on the PyTorch reference in fp32 or None)."""
    got = kernel_h(*args, backend, **kw)
    lowp = kernel_h(*args, "reference", dtype=torch.float32, **kw) if backend == "triton" else None
    return got, lowp


BACKENDS = ["reference", "triton"]


# ----------------------------------------------------------------------------------------------
# The three properties of the issue
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_gate_is_rome(world, backend):
    """σ((s−β)/τ) replaced by s(e): h = W' e with ROME's W' = W + (o* − W i*)(C⁻¹i*)ᵀ/(i*ᵀC⁻¹i*)."""
    W, i_star, o_star, Ci, e = world["W_v"], world["i_stars"][0], world["o_v"][0], world["C_inv"], world["e"]
    W_rome = W + torch.outer(o_star - W @ i_star, Ci @ i_star) / (i_star @ Ci @ i_star)
    expected = e @ W_rome.T
    h = R.perfusion_h(e, W, i_star[None], o_star[None], [0.0], [1.0], Ci, gate=lambda s, beta, tau: s)
    torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-12)
    # Kernel path: the concept's removal channel from row_tensors (gate channel emptied, O = 0),
    # plus o* moved to a linear channel: an extra slot whose coefficient is s(e) (P = G) and
    # whose removal vector is −o* gives + s(e)·o*.
    G = Ci @ i_star / (i_star @ Ci @ i_star)
    concept = R.Concept(i_star, torch.zeros(N, dtype=torch.float64), 0.0, 1.0)
    got, lowp = both(backend, e, W, [concept], Ci, extra=(G, -o_star, torch.zeros(D), torch.zeros(N)))
    check(got, expected, backend, lowp, msg="kernel path vs ROME")
    check(got, h, backend, lowp, msg="kernel path vs perfusion_h")


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_lock_at_i_star_gives_w_k_e_super(world, backend):
    """e = i*, β → −∞: h = o*; with o*_K = W_K e_super, K(i*) = W_K e_super."""
    W_k, i_star, Ci = world["W_k"], world["i_stars"][0], world["C_inv"]
    o_k = W_k @ world["e_super"]  # the key lock
    e = torch.stack([i_star, i_star])
    h = R.perfusion_h(e, W_k, i_star[None], o_k[None], [float("-inf")], [0.15], Ci)
    torch.testing.assert_close(h, torch.stack([o_k, o_k]), rtol=1e-12, atol=1e-12)
    got, lowp = both(backend, e, W_k, [R.Concept(i_star, o_k, float("-inf"), 0.15)], Ci)
    check(got, torch.stack([o_k, o_k]), backend, lowp, msg="K(i*) vs W_K e_super")
    check(got, h, backend, lowp, msg="kernel path vs perfusion_h")
    # a finite β only scales the lock by the gate σ((1 − β)/τ)
    h = R.perfusion_h(e, W_k, i_star[None], o_k[None], [0.75], [0.15], Ci)
    torch.testing.assert_close(h, torch.sigmoid(torch.tensor(0.25 / 0.15, dtype=torch.float64)) * o_k.expand(2, N))


@pytest.mark.parametrize("backend", BACKENDS)
def test_s_zero_leaves_w_e_plus_constant_gate(world, backend):
    """s(e) = 0: h = W e + σ(−β/τ)·o*."""
    W, i_star, o_star, Ci = world["W_v"], world["i_stars"][0], world["o_v"][0], world["C_inv"]
    x = world["e"]
    e = x - _s(x, i_star, Ci)[:, None] * i_star  # C⁻¹-orthogonal to i*
    assert _s(e, i_star, Ci).abs().max() < 1e-12
    beta, tau = BETAS[0], TAUS[0]
    expected = e @ W.T + torch.sigmoid(torch.tensor(-beta / tau, dtype=torch.float64)) * o_star
    h = R.perfusion_h(e, W, i_star[None], o_star[None], [beta], [tau], Ci)
    torch.testing.assert_close(h, expected, rtol=1e-12, atol=1e-12)
    got, lowp = both(backend, e, W, [R.Concept(i_star, o_star, beta, tau)], Ci)
    check(got, expected, backend, lowp, msg="kernel path, s = 0")
    check(got, h, backend, lowp, msg="kernel path vs perfusion_h")


# ----------------------------------------------------------------------------------------------
# Several concepts
# ----------------------------------------------------------------------------------------------


def test_basis_is_c_inv_orthonormal_and_spans_the_concepts(world):
    I, Ci = world["i_stars"], world["C_inv"]
    for J in (1, 2, 3):
        u = R.perfusion_basis(I[:J], Ci)
        torch.testing.assert_close(u @ Ci @ u.T, torch.eye(J, dtype=torch.float64), rtol=0, atol=1e-10)
        # every u_j is a combination of the i*: the least-squares residual vanishes
        coef = torch.linalg.lstsq(I[:J].T, u.T).solution
        torch.testing.assert_close(I[:J].T @ coef, u.T, rtol=0, atol=1e-10)
    u = R.perfusion_basis(I[:1], Ci)[0]
    q = I[0] @ Ci @ I[0]
    sign = torch.sign(u[0] / I[0, 0])
    torch.testing.assert_close(u, sign * I[0] / q.sqrt(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="linearly dependent"):
        R.perfusion_basis(torch.stack([I[0], 2 * I[0]]), Ci)


@pytest.mark.parametrize("backend", BACKENDS)
def test_projection_removes_every_concept(world, backend):
    """With o* = 0 the kernel path computes W e_⊥; e_⊥ = 0 for e in span{i*_j}."""
    I, Ci, W = world["i_stars"], world["C_inv"], world["W_k"]
    concepts = [R.Concept(I[j], torch.zeros(N, dtype=torch.float64), BETAS[j], TAUS[j]) for j in range(3)]
    e = torch.stack([I[0], I[1], I[2], I[0] - 2 * I[2]])
    got = kernel_h(e, W, concepts, Ci, backend)
    tol = 1e-10 if backend == "reference" else 1e-4
    assert got.abs().max() < tol * (e @ W.T).abs().max()
    # ...and a direction C⁻¹-orthogonal to all of them passes through untouched
    u = R.perfusion_basis(I, Ci)
    x = world["e"][:3]
    x_perp = x - (x @ Ci @ u.T) @ u
    got, lowp = both(backend, x_perp, W, [c._replace(beta=float("inf")) for c in concepts], Ci)
    check(got, x_perp @ W.T, backend, lowp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("J", [1, 2, 3])
def test_kernel_path_equals_paper_equations(world, backend, J):
    """row_tensors + rank1_edit == perfusion_h for J concepts with their own β, τ, on K and V."""
    I, Ci, e = world["i_stars"][:J], world["C_inv"], world["e"]
    for W, O in ((world["W_k"], torch.stack([world["W_k"] @ world["e_super"]] * J)), (world["W_v"], world["o_v"][:J])):
        concepts = [R.Concept(I[j], O[j], BETAS[j], TAUS[j]) for j in range(J)]
        h = R.perfusion_h(e, W, I, O, BETAS[:J], TAUS[:J], Ci)
        # extra zero slots (slots=4) are unused and must change nothing
        got, lowp = both(backend, e, W, concepts, Ci, slots=4)
        check(got, h, backend, lowp=lowp, msg=f"J={J}")
    if J == 1:
        # the App. B form (basis) equals the paper's single-concept form W e − s W i*
        W, i_star = world["W_v"], I[0]
        s = _s(e, i_star, Ci)
        paper = e @ W.T - s[:, None] * (W @ i_star) + torch.sigmoid((s[:, None] - BETAS[0]) / TAUS[0]) * world["o_v"][0]
        torch.testing.assert_close(R.perfusion_h(e, W, I, world["o_v"][:1], BETAS[:1], TAUS[:1], Ci), paper)


def test_rows_with_different_concepts_in_one_call(world):
    """One batch: row 0 has concepts {0, 1}, row 1 concept {2} (slot 1 unused), row 2 none."""
    I, Ci, W, O, e = world["i_stars"], world["C_inv"], world["W_v"], world["o_v"], world["e"]
    sets = [[0, 1], [2], []]
    rows = [R.row_tensors(W, [R.Concept(I[j], O[j], BETAS[j], TAUS[j]) for j in js], Ci, slots=2, dtype=torch.float64) for js in sets]
    P, WU, G, Ot, beta, tau = (torch.stack(t) for t in zip(*rows))
    E = e.expand(3, *e.shape)
    out = rank1_edit(E @ W.T, E, P, WU, G, Ot, beta, tau, backend="reference")
    for r, js in enumerate(sets):
        expected = R.perfusion_h(e, W, I[js], O[js], [BETAS[j] for j in js], [TAUS[j] for j in js], Ci) if js else e @ W.T
        torch.testing.assert_close(out[r], expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Fingerprint and C⁻¹
# ----------------------------------------------------------------------------------------------


def _tiny_unet(seed=0):
    from diffusers import UNet2DConditionModel

    from impasto.tiny import UNET_CONFIG

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def test_fingerprint():
    unet = _tiny_unet()
    fp = R.fingerprint(unet)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    # independent recomputation: the state dict lists the attn2 K/V weights in module order
    h = hashlib.sha256()
    keys = [k for k in unet.state_dict() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
    assert len(keys) == 2 * len(R.attn2_projections(unet)) and len(keys) > 0
    for k in keys:
        h.update(unet.state_dict()[k].float().numpy().tobytes())
    assert fp == h.hexdigest()[:16]
    assert R.fingerprint(_tiny_unet()) == fp  # stable: same weights, same fingerprint
    assert R.fingerprint(_tiny_unet(seed=1)) != fp
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight.add_(1.0)
    assert R.fingerprint(unet) == fp  # self-attention is not part of it
    with torch.no_grad():
        w = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_v.weight
        w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(float("inf")))
    assert R.fingerprint(unet) != fp  # one ulp of one attn2 weight changes it
    with pytest.raises(AdapterError, match="no attn2"):
        R.fingerprint(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def text_model():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from impasto.tiny import TEXT_CONFIG, TOKENIZER_DIR

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77), te


CAPTIONS = ["a photo of a cat", "a red car on a street", "two dogs", "an oil painting of a harbour at dusk", "a teddy bear"]


def test_covariance_is_uncentered_over_all_77_positions_per_caption(text_model):
    tok, te = text_model
    C = R.compute_covariance(tok, te, CAPTIONS, batch_size=2)
    expected = torch.zeros(32, 32, dtype=torch.float64)
    with torch.no_grad():
        for caption in CAPTIONS:
            ids = tok(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
            assert ids.shape == (1, 77)
            enc = te(ids).last_hidden_state[0].double()  # [77, 32], padding included
            expected += sum(torch.outer(x, x) for x in enc)
    expected /= len(CAPTIONS)  # divided by the number of captions, not of tokens
    torch.testing.assert_close(C, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(R.compute_covariance(tok, te, CAPTIONS, batch_size=64), C, rtol=1e-10, atol=1e-10)
    assert C.dtype == torch.float64 and torch.linalg.eigvalsh(C).min() > 0


def test_covariance_store(tmp_path, text_model):
    tok, te = text_model
    C_inv = R.inverse_covariance(R.compute_covariance(tok, te, CAPTIONS))
    fp = R.fingerprint(_tiny_unet())
    root = tmp_path / "adapters"
    path = R.save_covariance(root, fp, C_inv, num_captions=len(CAPTIONS))
    assert path == R.covariance_path(root, fp) == root / "covariance" / f"{fp}.safetensors"
    loaded = R.load_covariance(root, fp, dim=32)
    assert loaded.dtype == torch.float32 and torch.equal(loaded, C_inv.float())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["impasto.fingerprint"] == fp and meta["impasto.num_captions"] == str(len(CAPTIONS))
    # refusals
    other = "0123456789abcdef"
    with pytest.raises(AdapterError, match="no C⁻¹ for base model"):
        R.load_covariance(root, other)
    R.covariance_path(root, other).write_bytes(path.read_bytes())  # a file filed under the wrong base
    with pytest.raises(AdapterShapeError, match="made for another base model"):
        R.load_covariance(root, other)
    with pytest.raises(AdapterShapeError, match=r"expected \[768, 768\]"):
        R.load_covariance(root, fp, dim=768)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    with pytest.raises(AdapterError, match="model folder"):
        R.save_covariance(model_dir / "engine", fp, C_inv, num_captions=5, model_dir=model_dir)
    assert not any(model_dir.rglob("*.safetensors"))
    with pytest.raises(AdapterValueError, match="NaN"):
        R.save_covariance(root, fp, C_inv * float("nan"), num_captions=5)
    with pytest.raises(ValueError, match="hex"):
        R.covariance_path(root, "../../etc")


# ----------------------------------------------------------------------------------------------
# The rank1 file
# ----------------------------------------------------------------------------------------------

SD15_LAYERS = (
    [(f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", h) for b, h in enumerate((320, 640, 1280)) for a in (0, 1)]
    + [(f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", h) for b, h in zip((1, 2, 3), (1280, 640, 320)) for a in (0, 1, 2)]
    + [("mid_block.attentions.0.transformer_blocks.0.attn2", 1280)]
)


def _concept(shapes, D_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {name: (torch.randn(k[0], generator=g), torch.randn(v[0], generator=g)) for name, (k, v) in shapes.items()}
    return dict(
        layers=layers,
        i_star=torch.randn(D_in, generator=g),
        token_embedding=torch.randn(D_in, generator=g),
        placeholder="<sks>",
        super_word="teddy",
        beta=0.7,
        tau=0.15,
        fingerprint="0123456789abcdef",
    )


def test_sd15_file_is_about_100_kb(tmp_path):
    shapes = {name: ((h, 768), (h, 768)) for name, h in SD15_LAYERS}
    assert len(shapes) == 16 and sum(h for _, h in SD15_LAYERS) == 12480
    kw = _concept(shapes, 768)
    path = tmp_path / "sd15.rank1.safetensors"
    R.write_rank1(path, **kw)
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    tensor_bytes = 4 * (2 * sum(h for _, h in SD15_LAYERS) + 768 + 768)
    assert len(data) - 8 - header_len == tensor_bytes == 105_984
    assert len(data) < 110 * 1024, f"{len(data)} bytes"
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"]["impasto.family"] == "rank1"
    f = R.read_rank1(path, base_shapes=shapes, fingerprint=kw["fingerprint"], embedding_dim=768)
    assert len(f.layers) == 16


def test_round_trip_against_the_tiny_base(tmp_path):
    unet = _tiny_unet()
    shapes = R.base_shapes(unet)
    fp = R.fingerprint(unet)
    kw = {**_concept(shapes, 32), "fingerprint": fp}
    path = tmp_path / "c.safetensors"
    R.write_rank1(path, **kw)
    header = R.read_rank1_header(path)
    assert (header.placeholder, header.super_word, header.beta, header.tau, header.fingerprint) == ("<sks>", "teddy", 0.7, 0.15, fp)
    assert header.format_version == R.FORMAT_VERSION and set(header.dtypes.values()) == {"F32"}
    f = R.read_rank1(path, base_shapes=shapes, fingerprint=fp, embedding_dim=32)
    assert list(f.layers) == list(shapes)
    for name, (o_k, o_v) in kw["layers"].items():
        assert torch.equal(f.layers[name][0], o_k) and torch.equal(f.layers[name][1], o_v)
    assert torch.equal(f.i_star, kw["i_star"]) and torch.equal(f.token_embedding, kw["token_embedding"])
    assert (f.placeholder, f.super_word, f.beta, f.tau, f.fingerprint) == ("<sks>", "teddy", 0.7, 0.15, fp)


def _rewrite(src, dst, *, drop=(), tensors=None, metadata=None, drop_meta=()):
    with safe_open(str(src), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        m = {k: v for k, v in f.metadata().items() if k not in drop_meta}
    t.update(tensors or {})
    m.update(metadata or {})
    save_file(t, str(dst), metadata=m)
    return dst


LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(drop_meta=["impasto.tau"]), AdapterFormatError, "metadata key 'impasto.tau' is missing"),
        (dict(drop_meta=["impasto.fingerprint"]), AdapterFormatError, "'impasto.fingerprint' is missing"),
        (dict(metadata={"impasto.family": "lora"}), AdapterFormatError, "impasto.family is 'lora'"),
        (dict(metadata={"impasto.format_version": "2"}), AdapterFormatError, "impasto.format_version is '2'"),
        (dict(metadata={"impasto.beta": "high"}), AdapterFormatError, "impasto.beta is 'high'"),
        (dict(metadata={"impasto.tau": "0"}), AdapterValueError, "impasto.tau is 0.0"),
        (dict(metadata={"impasto.placeholder": ""}), AdapterFormatError, "impasto.placeholder is empty"),
        (dict(drop=["i_star"]), AdapterFormatError, "key 'i_star' is missing"),
        (dict(drop=[LAYER + ".to_v.o_star"]), AdapterFormatError, f"key '{LAYER}.to_v.o_star' is missing"),
        (dict(tensors={"lora_A": torch.zeros(3)}), AdapterFormatError, "unknown key 'lora_A'"),
        (dict(tensors={"i_star": torch.zeros(32, dtype=torch.float16)}), AdapterValueError, "key 'i_star' has dtype F16"),
        (dict(tensors={LAYER + ".to_k.o_star": torch.full((32,), float("nan"))}), AdapterValueError, "NaN or Inf"),
        (dict(tensors={"token_embedding": torch.full((32,), float("inf"))}), AdapterValueError, "'token_embedding' holds NaN"),
        (dict(tensors={LAYER + ".to_k.o_star": torch.zeros(1, 32)}), AdapterShapeError, "must be a vector"),
        (dict(tensors={LAYER + ".to_k.o_star": torch.zeros(31)}), AdapterShapeError, "differ in length"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_files_are_refused(tmp_path, change, error, match):
    unet_shapes = R.base_shapes(_tiny_unet())
    good = tmp_path / "good.safetensors"
    R.write_rank1(good, **_concept(unet_shapes, 32))
    bad = _rewrite(good, tmp_path / "bad.safetensors", **change)
    with pytest.raises(error, match=match) as info:
        R.read_rank1(bad)
    assert str(bad) in str(info.value)


def test_mismatched_base_is_refused(tmp_path):
    unet = _tiny_unet()
    shapes = R.base_shapes(unet)
    fp = R.fingerprint(unet)
    path = tmp_path / "c.safetensors"
    R.write_rank1(path, **{**_concept(shapes, 32), "fingerprint": fp})
    with pytest.raises(AdapterShapeError, match="made for another base model"):
        R.read_rank1(path, fingerprint=R.fingerprint(_tiny_unet(seed=1)))
    fewer = dict(list(shapes.items())[:-1])
    with pytest.raises(AdapterShapeError, match="names no attn2 layer of the base"):
        R.read_rank1(path, base_shapes=fewer)
    more = {**shapes, "extra.attn2": ((32, 32), (32, 32))}
    with pytest.raises(AdapterShapeError, match="'extra.attn2'.*the file lacks"):
        R.read_rank1(path, base_shapes=more)
    wider = {**shapes, LAYER: ((48, 32), (48, 32))}
    with pytest.raises(AdapterShapeError, match=f"'{LAYER}.to_k.o_star' has 32 values, the base's .*to_k outputs 48"):
        R.read_rank1(path, base_shapes=wider)
    sd2 = {n: ((k[0], 1024), (v[0], 1024)) for n, (k, v) in shapes.items()}
    with pytest.raises(AdapterShapeError, match="'i_star' has 32 values"):
        R.read_rank1(path, base_shapes=sd2)
    with pytest.raises(AdapterShapeError, match="token_embedding"):
        R.read_rank1(path, embedding_dim=768)
    for p, err in ((tmp_path / "none.safetensors", "no such file"), (tmp_path / "junk.safetensors", "not a readable")):
        if "junk" in p.name:
            p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        with pytest.raises(AdapterFormatError, match=err):
            R.read_rank1(p)


def test_write_refuses_bad_values(tmp_path):
    shapes = R.base_shapes(_tiny_unet())
    kw = _concept(shapes, 32)
    with pytest.raises(AdapterValueError, match="'i_star' holds NaN"):
        R.write_rank1(tmp_path / "a", **{**kw, "i_star": torch.full((32,), float("nan"))})
    with pytest.raises(AdapterValueError, match="impasto.tau"):
        R.write_rank1(tmp_path / "b", **{**kw, "tau": -1.0})
    with pytest.raises(AdapterShapeError, match="must be a vector"):
        R.write_rank1(tmp_path / "c", **{**kw, "token_embedding": torch.zeros(1, 32)})
    assert not any(tmp_path.iterdir())
