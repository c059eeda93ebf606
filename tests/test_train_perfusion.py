"""impasto.train.perfusion: gradients through the rank1 family's plan edit and rank1_edit's
autograd equal an independent plain-PyTorch implementation of the paper's equations (diffusers'
UNet and text encoder, to_k/to_v replaced by h(e) at the prompt's positions and W e on the
padding); the EMA of i* replayed from checkpoints; the fixed o*_K; seed reproducibility and
resume; captions= and the row's norm clamp; the written file registered and served; key_lock on
and off; bad inputs; the CLI; and one short training run on the shipped model, with the
protocol's reference captions, that teaches it the sparkle (the issue's base + 0.25)."""

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import impasto
from impasto.adapters.rank1 import SUFFIX_K, SUFFIX_V
from impasto.attention import cross_attention_layers
from impasto.train import TrainInputError, perfusion
from impasto.train.perfusion import FILE_NAME, perfusion_loss, perfusion_trainer
from test_rank1_serving import CAPTIONS, TOL, _diff, _reference, edited_positions
from test_train import hostile_checkpoint, render_folder, renders

STEPS = 4
PH, WORD = "<sks>", "star"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("root")


@pytest.fixture(scope="module")
def eng(tiny_dir, root):
    """The random tiny model; its C⁻¹ is computed by the first run (covariance_captions=) under this root,
    where the adapters it serves must live too."""
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(root))
    yield e
    e.close()


def _perturb(params, seed=5, frac=0.3):
    """Away from the initial values, so every gate and projection term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.add_(frac * torch.randn(p.shape, generator=g) * p.abs().mean())


# ---------------------------------------------------------------------------- the reference
class PaperProjection(torch.nn.Module):
    """h(e) = W e − s(e)·W i* + σ((s(e) − β)/τ)·o*, s(e) = i*ᵀC⁻¹e / (i*ᵀC⁻¹i*) (paper §3), fp64,
    at the positions `edited` marks (Shape [B, 77] bool, set per batch); W e on the padding."""

    def __init__(self, W, i_star, o_star, C_inv, beta, tau):
        super().__init__()
        self.W, self.i, self.o, self.C_inv, self.beta, self.tau = W.double(), i_star.double(), o_star, C_inv.double(), beta, tau
        self.edited = None

    def forward(self, e):
        e = e.double()
        s = (e @ self.C_inv @ self.i) / (self.i @ self.C_inv @ self.i)
        h = e @ self.W.T - s[..., None] * (self.W @ self.i) + torch.sigmoid((s - self.beta) / self.tau)[..., None] * self.o.double()
        if self.edited is not None:
            h = torch.where(self.edited[..., None], h, e @ self.W.T)
        return h.float()


def edit_positions(pipe, texts):
    """Every PaperProjection of `pipe` edits BOS, the text's tokens and, if EDIT_EOS, its EOS (see
    test_rank1_serving.edited_positions), never the padding after it."""
    edited = edited_positions(pipe.tokenizer, texts)
    for attn in cross_attention_layers(pipe.unet).values():
        attn.to_k.edited = attn.to_v.edited = edited
    return edited


def paper_pipeline(tiny_dir, method):
    """diffusers' UNet and text encoder; the placeholder added to the tokenizer with the trained
    row; every attn2 to_k / to_v replaced by PaperProjection with leaf copies of the o*."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    tok.add_tokens([method.placeholder])
    te.resize_token_embeddings(len(tok))
    pid = tok.convert_tokens_to_ids(method.placeholder)
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        emb[pid] = method.token.detach()
    te.requires_grad_(False)
    emb.requires_grad_(True)
    leaves = {}
    for name, attn in cross_attention_layers(unet).items():
        o_k = method.o_k[name].detach().clone().requires_grad_(True)
        o_v = method.o_v[name].detach().clone().requires_grad_(True)
        leaves[name] = (o_k, o_v)
        attn.to_k = PaperProjection(attn.to_k.weight.detach(), method.i_star, o_k, method.C_inv, method.beta, method.tau)
        attn.to_v = PaperProjection(attn.to_v.weight.detach(), method.i_star, o_v, method.C_inv, method.beta, method.tau)
    return pipe, pid, leaves


def concept_encodings(pipe, pid, texts):
    """The text encoder's output at the placeholder token in each text (diffusers tokenization)."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids)[0]
    return ids, hidden, torch.stack([hidden[b, int((ids[b] == pid).nonzero()[0])] for b in range(len(texts))])


def test_gradients_equal_the_papers_equations(tiny_dir, eng, monkeypatch):
    """key_lock=False: every trained tensor (row, o*_K, o*_V) checked in one run (with the lock,
    the set is the same minus o*_K, `test_trainable_sets`; the locked path runs in `run_a`)."""
    key_lock = False
    calls = []
    kernel = impasto.adapters.families.rank1.rank1_edit

    def counting(*a, **kw):
        out = kernel(*a, **kw)
        calls.append(out.requires_grad)
        return out

    monkeypatch.setattr(impasto.adapters.families.rank1, "rank1_edit", counting)
    tr = perfusion_trainer(eng, renders(), super_word=WORD, masks=[np.ones((32, 32))] * 3 + [np.eye(32)],
                           batch_size=2, key_lock=key_lock, seed=1, covariance_captions=CAPTIONS)
    m = tr.method
    assert set(tr.params) == {f"token.{PH}"} | {n + SUFFIX_V for n in m.o_v} | (
        set() if key_lock else {n + SUFFIX_K for n in m.o_k})
    _perturb(tr.params)
    i_before = m.i_star.clone()
    batch = tr.make_batch()
    loss = tr.loss(batch)  # the EMA of i* runs first, then the forward
    loss.backward()
    assert calls and all(calls) and len(calls) == 2 * len(eng.attn2)  # every K and V, with autograd
    pipe, pid, leaves = paper_pipeline(tiny_dir, m)
    with torch.no_grad():  # i* ← 0.99 i* + 0.01 mean_b e_concept, from diffusers' own encoding
        _, _, e_c = concept_encodings(pipe, pid, batch.texts[: batch.n_instance])
        i_ref = 0.99 * i_before + 0.01 * e_c.mean(0)
    assert float((m.i_star - i_ref).norm() / i_ref.norm()) <= 1e-6
    _, hidden, _ = concept_encodings(pipe, pid, batch.texts)
    x_t = tr.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    edited = edit_positions(pipe, batch.texts)
    assert 0 < int(edited.sum()) < edited.numel()  # both kinds of position are there
    pred = pipe.unet(x_t, batch.timesteps, hidden).sample
    mask = batch.mask
    ref_loss = ((pred * mask - batch.noise * mask) ** 2).mean()  # ChenDarYen p_losses, written out
    ref_loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * float(ref_loss.detach())
    ref = {f"token.{PH}": pipe.text_encoder.get_input_embeddings().weight.grad[pid]}
    for name, (o_k, o_v) in leaves.items():
        ref[name + SUFFIX_V] = o_v.grad
        if not key_lock:
            ref[name + SUFFIX_K] = o_k.grad
    assert set(ref) == set(tr.params)
    for name, p in tr.params.items():
        assert p.grad is not None and float(ref[name].norm()) > 0, name
        rel = float((p.grad - ref[name]).norm() / ref[name].norm())
        assert rel <= 1e-5, (name, rel)


def test_trainable_sets(eng):
    locked = perfusion_trainer(eng, renders(n=1), super_word=WORD, covariance_captions=CAPTIONS)
    free = perfusion_trainer(eng, renders(n=1), super_word=WORD, covariance_captions=CAPTIONS, key_lock=False)
    values = {n + SUFFIX_V for n in eng.attn2}
    assert set(locked.params) == {f"token.{PH}"} | values
    assert set(free.params) == set(locked.params) | {n + SUFFIX_K for n in eng.attn2}
    assert [g["lr"] for g in locked.optimizer.param_groups] == [0.006, 0.03]  # ChenDarYen's two rates
    assert not any(t.requires_grad for t in locked.method.o_k.values())


def test_captions_reach_the_batch_and_i_star(tiny_dir, eng):
    """captions= gives each image its own prompt ({placeholder} and {super_word} filled in, as
    custom_diffusion's captions= does), i*₀ is the mean of diffusers' encodings of those prompts
    at the placeholder with the super word's row, and a wrong count, a caption without the
    placeholder or an unknown field is refused."""
    caps = ["a {placeholder} on a gray background, flat", "a large {placeholder} {super_word} on a red background, flat"]
    tr = perfusion_trainer(eng, renders(n=2), super_word=WORD, captions=caps, batch_size=3, seed=0,
                           covariance_captions=CAPTIONS)
    want = [f"a {PH} on a gray background, flat", f"a large {PH} {WORD} on a red background, flat"]
    assert [e.prompt for e in tr.instance] == want and all(e.mask is None for e in tr.instance)
    batch = tr.make_batch()
    assert set(batch.texts) <= set(want) and batch.n_instance == 3
    pipe, pid, _ = paper_pipeline(tiny_dir, tr.method)
    with torch.no_grad():
        i0 = concept_encodings(pipe, pid, want)[2].double().mean(0)
    assert float((tr.method.i_star.double() - i0).norm() / i0.norm()) <= 1e-6
    plain = perfusion_trainer(eng, renders(n=2), super_word=WORD, covariance_captions=CAPTIONS)
    assert [e.prompt for e in plain.instance] == [f"a {PH}"] * 2  # the default template
    assert float((plain.method.i_star - tr.method.i_star).norm()) > 0
    for bad, what in ((caps[:1], "one per image"), (["a star", caps[1]], "placeholder"),
                      (["a {placeholder} {class_word}", caps[1]], "super_word")):
        with pytest.raises(TrainInputError, match=what):
            perfusion_trainer(eng, renders(n=2), super_word=WORD, captions=bad, covariance_captions=CAPTIONS)


def test_norm_clamp_holds_the_row(eng):
    """max_norm_ratio: after every step the row is at most that multiple of the super word's norm
    (and rescaled only when over it); without it the same steps grow the row past the bound."""
    emb = eng.base.text_encoder.get_input_embeddings().weight
    super_norm = float(emb[eng.base.tokenizer(WORD, add_special_tokens=False).input_ids[0]].norm())
    norms = {}
    for ratio in (None, 1.05):
        tr = perfusion_trainer(eng, renders(n=2), super_word=WORD, batch_size=1, seed=0, lr_embedding=0.05,
                               max_norm_ratio=ratio, covariance_captions=CAPTIONS)
        norms[ratio] = []
        for _ in range(3):
            tr.train_step()
            norms[ratio].append(float(tr.method.token.detach().norm()))
    assert max(norms[None]) > 1.05 * super_norm * 1.01, norms  # the bound binds on this run
    assert all(n <= 1.05 * super_norm * (1 + 1e-6) for n in norms[1.05]), norms
    assert max(norms[1.05]) >= 1.05 * super_norm * (1 - 1e-6)
    with pytest.raises(TrainInputError, match="max_norm_ratio"):
        perfusion_trainer(eng, renders(n=1), super_word=WORD, max_norm_ratio=0.0, covariance_captions=CAPTIONS)


def test_accumulate_is_micro_batches_each_after_its_ema(eng):
    """accumulate=k (ChenDarYen's accumulate_grad_batches): one optimizer step's gradient is the
    mean of k micro-batches' gradients, drawn one after another from the run's RNGs, each forward
    after its own EMA update of i* (k updates per step); replayed with accumulate=1's pieces."""
    kw = dict(super_word=WORD, batch_size=2, seed=1, covariance_captions=CAPTIONS, captions=[
        "a {placeholder} on a red background, flat", "a small {placeholder} on a gray background, flat",
        "a {placeholder} on a blue background, flat", "a large {placeholder} on a white background, flat"])
    tr = perfusion_trainer(eng, renders(), accumulate=2, **kw)
    ref = perfusion_trainer(eng, renders(), **kw)
    grads, losses, texts = [], [], []
    for _ in range(2):  # the two micro-batches, by hand, no optimizer step in between
        batch = ref.make_batch()
        texts.append(batch.texts)
        loss = ref.loss(batch)
        loss.backward()
        grads.append({k: p.grad.detach().clone() for k, p in ref.params.items()})
        losses.append(float(loss.detach()))
        ref.optimizer.zero_grad(set_to_none=True)
    seen = {}
    tr.method.after_backward = lambda: seen.update({k: p.grad.detach().clone() for k, p in tr.params.items()})
    drawn = []
    make = tr.make_batch
    tr.make_batch = lambda: drawn.append(make()) or drawn[-1]
    tr.train_step()
    assert [b.texts for b in drawn] == texts and len(set(map(tuple, texts))) == 2  # two different draws
    assert torch.equal(tr.method.i_star, ref.method.i_star)  # two EMA updates, each on its micro-batch
    i0 = perfusion_trainer(eng, renders(), **kw).method.i_star
    assert float((tr.method.i_star - i0).norm()) > 0
    for k, g in seen.items():
        want = (grads[0][k] + grads[1][k]) / 2
        assert float((g - want).norm() / want.norm()) <= 1e-6, k
        assert float((grads[0][k] - grads[1][k]).norm()) > 1e-3 * float(want.norm()), k  # the mean is not one of them
    assert tr.losses == [pytest.approx(sum(losses) / 2, rel=1e-12)] and tr.step == 1
    with pytest.raises(TrainInputError, match="accumulate"):
        perfusion_trainer(eng, renders(n=1), accumulate=0, super_word=WORD, covariance_captions=CAPTIONS)


def test_loss_is_the_community_codes():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    mask = torch.rand(2, 1, 5, 5, generator=g)
    loss = perfusion_loss(pred, target, mask, 2, 0.5)
    inst = torch.stack([((pred[b] * mask[b] - target[b] * mask[b]) ** 2).mean() for b in range(2)]).mean()
    assert torch.allclose(loss, inst + 0.5 * ((pred[2] - target[2]) ** 2).mean())


# ---------------------------------------------------------------------------- runs
def _run(eng, out, **kw):
    args = dict(super_word=WORD, steps=STEPS, batch_size=2, output=out, progress=False, seed=3, covariance_captions=CAPTIONS)
    return perfusion(eng, renders(), **{**args, **kw})


@pytest.fixture(scope="module")
def run_a(eng, root):
    return _run(eng, root / "a", checkpoint_every=1)


def test_ema_of_i_star_and_the_fixed_key(tiny_dir, eng, run_a):
    """Replayed independently: i*₀ = diffusers' encoding of "a star" at "star"; before step k,
    i* ← 0.99 i* + 0.01 mean_b e_concept(row after k steps, from checkpoint-k); o*_K = W_K i*₀."""
    f = load_file(run_a.files["rank1"])
    tr = perfusion_trainer(eng, renders(), super_word=WORD, covariance_captions=CAPTIONS)
    pipe, pid, _ = paper_pipeline(tiny_dir, tr.method)
    te, tok = pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        ids = tok(f"a {WORD}", padding="max_length", max_length=77, return_tensors="pt").input_ids
        i_star = te(ids)[0][0, 2].double()  # BOS a star
        rows = [tr.method.token.detach()] + [
            torch.load(os.path.join(run_a.path, f"checkpoint-{k}", "state.pt"), weights_only=True)["params"][f"token.{PH}"]
            for k in range(1, STEPS)]
        emb = te.get_input_embeddings().weight
        for row in rows:  # every instance prompt is "a <sks>": the batch mean is the one encoding
            emb[pid] = row
            i_star = 0.99 * i_star + 0.01 * concept_encodings(pipe, pid, [f"a {PH}"])[2][0].double()
        for name, attn in cross_attention_layers(eng.base.unet).items():
            o_k = attn.to_k.weight.double() @ te(ids)[0][0, 2].double()
            assert float((f[name + SUFFIX_K].double() - o_k).norm() / o_k.norm()) <= 1e-6, name
    assert float((f["i_star"].double() - i_star).norm() / i_star.norm()) <= 1e-6
    assert float((f["i_star"] - tr.method.i_star).norm()) > 0  # it moved


def _files(folder):
    """Every safetensors file's metadata and tensor bytes (the header's key order is not fixed)."""
    out = {}
    for n in sorted(os.listdir(folder)):
        if n.endswith(".safetensors"):
            with safe_open(os.path.join(folder, n), "pt") as f:
                out[n] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())})
    return out


def test_same_seed_same_file_and_resume(eng, run_a, tmp_path):
    b = _run(eng, tmp_path / "b")
    c = _run(eng, tmp_path / "c", seed=4)
    assert _files(run_a.path) == _files(b.path) and run_a.losses == b.losses
    assert _files(run_a.path) != _files(c.path)
    assert len(run_a.losses) == STEPS and all(np.isfinite(run_a.losses))
    out = tmp_path / "r"
    first = _run(eng, out, steps=2, checkpoint_every=2)
    assert len(first.losses) == 2 and os.path.isfile(out / "checkpoint-2" / "state.pt")
    second = _run(eng, out, resume=True, checkpoint_every=2)
    assert second.losses == run_a.losses and _files(out) == _files(run_a.path) and second.steps == STEPS


def test_written_file_registers_and_serves(tiny_dir, eng, run_a):
    """The store registers it as rank1; generate equals the paper's pipeline on the file."""
    path = run_a.files["rank1"]
    assert os.path.basename(path) == FILE_NAME and run_a.nbytes == os.path.getsize(path)
    eng.adapters.register("trained", path)
    try:
        assert eng.adapters.info("trained").family == "rank1"
        prompt = f"a {PH} on a blue background"
        out = eng.generate(prompt, adapters=["trained"], steps=4, seed=2, output_type="np").images
    finally:
        eng.adapters.unregister("trained")
    ref = _reference(tiny_dir, eng, [(PH, path)], prompt, 2)
    base = eng.generate(f"a {WORD} on a blue background", steps=4, seed=2, output_type="np").images
    assert _diff(out, ref) <= TOL and _diff(out, base) > 1e-2


def test_without_the_key_lock_o_k_trains(eng, run_a, tmp_path):
    r = _run(eng, tmp_path / "nolock", key_lock=False, steps=2)
    locked, free = load_file(run_a.files["rank1"]), load_file(r.files["rank1"])
    tr = perfusion_trainer(eng, renders(), super_word=WORD, covariance_captions=CAPTIONS)
    for name, attn in eng.attn2.items():
        init = tr.method.o_k[name]
        assert torch.equal(locked[name + SUFFIX_K], init), name  # bit for bit: never touched
        assert float((free[name + SUFFIX_K] - init).norm()) > 1e-4 * float(init.norm()), name


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named(tiny_dir, eng, tmp_path):
    kw = dict(super_word=WORD, steps=1, output=tmp_path / "o", progress=False, covariance_captions=CAPTIONS)
    with pytest.raises(TrainInputError, match="exactly one"):
        perfusion(eng, renders(n=1), **{**kw, "super_word": "shooting star"})
    with pytest.raises(TrainInputError, match="super_word"):
        perfusion(eng, renders(n=1), **{**kw, "super_word": None})
    with pytest.raises(TrainInputError, match="is not a folder"):
        perfusion(eng, str(tmp_path / "missing"), **kw)
    with pytest.raises(TrainInputError, match="form <name>"):
        perfusion(eng, renders(n=1), placeholder="sks", **kw)
    with pytest.raises(TrainInputError, match="masks"):
        perfusion(eng, renders(n=2), masks=[np.ones((32, 32))], **kw)
    for bad in (dict(tau=0.0), dict(beta=float("nan")), dict(ema=1.0), dict(lr_value=-1.0),
                dict(lr_embedding=float("inf")), dict(serve_tau=-0.1), dict(key_lock="yes"), dict(steps=0)):
        with pytest.raises(TrainInputError, match=next(iter(bad))):
            perfusion(eng, renders(n=1), **{**kw, **bad})
    # a base without its C⁻¹: named, with the way to compute it
    bare = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(tmp_path / "bare"))
    try:
        with pytest.raises(TrainInputError, match="impasto covariance"):
            perfusion(bare, renders(n=1), **{**kw, "covariance_captions": None})
    finally:
        bare.close()
    hostile_checkpoint(tmp_path / "h", 5, tmp_path / "pwned")
    with pytest.raises(TrainInputError, match="state.pt"):
        perfusion(eng, renders(n=1), **{**kw, "steps": 6, "output": tmp_path / "h"}, resume=True)
    assert not (tmp_path / "pwned").exists()


def test_cli_trains_and_summarizes(tiny_dir, tmp_path, capsys):
    from impasto.cli import main

    imgs = render_folder(tmp_path / "imgs")
    (tmp_path / "captions.txt").write_text("\n".join(CAPTIONS))
    common = ["--model", tiny_dir, "--placeholder", PH, "--super-word", WORD, "--adapter-root", str(tmp_path / "root"),
              "-q", "--steps", "1", "--batch-size", "1"]
    rc = main(["train", "perfusion", "--images", str(imgs), "-o", str(tmp_path / "out"), "--covariance-captions",
               str(tmp_path / "captions.txt"), *common])
    out = capsys.readouterr().out
    assert rc == 0 and "trained 1 steps" in out and FILE_NAME in out and "bytes" in out
    assert os.path.isfile(tmp_path / "out" / FILE_NAME)
    rc = main(["train", "perfusion", "--images", str(tmp_path / "nope"), "-o", str(tmp_path / "out2"), *common])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err


def test_cli_passes_accumulate(tmp_path, monkeypatch):
    import impasto.train
    from impasto.cli import main

    seen = {}

    def spy(engine, images, **kw):
        seen.update(kw)
        raise TrainInputError("stop here")

    monkeypatch.setattr(impasto.train, "perfusion", spy)
    rc = main(["train", "perfusion", "--images", str(tmp_path), "-o", str(tmp_path / "o"), "--super-word", WORD,
               "-q", "--accumulate", "4", "--batch-size", "2"])
    assert rc == 2 and seen["accumulate"] == 4 and seen["batch_size"] == 2


# ---------------------------------------------------------------------------- quality
# This test's protocol, measured (benchmarks/RESULTS.md, "Perfusion", CI-sized run): base 0.125 /
# 0.760; the protocol's recipe (reference captions, no masks) at 200 steps 0.656 / 0.833 at
# β 0.8 / τ 0.15 (the one gate chosen on the validation split), 0.656 / 0.771 at 0.7 / 0.15; the
# previous recipe ("a <sks>", masks) reached 0.344 at best, under base + 0.25 (0.375).
QUALITY_STEPS, QUALITY_GATE = 200, dict(beta=0.8, tau=0.15)


def test_short_run_teaches_the_sparkle(tmp_path):
    """The shipped model, the protocol's sparkle (eval.concept_set: 8 references, each captioned
    with its own size, background and style, no masks), every other training default, 200 steps
    (≈ 55 s at the ≈ 0.26 s/step of one thread), on 32 fixed held-out seeds (10 DDIM steps,
    guidance 7.5): the issue's target, concept fidelity at least the base's + 0.25 (measured 0.656
    against 0.125), and the prompt keeps control (prompt fidelity at most 0.1 under the base's: a
    gate that opens on the prompt's other words costs 0.3-0.4, docs/training.md).
    The sparkle: the world's most learnable held-out object (a four-point star beside the super
    word's five-point one); at 32 px the key-locked Perfusion barely teaches the crescent moon or
    the arrow."""
    from impasto import eval as ev

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measured configuration (benchmarks/RESULTS.md)
    eng = impasto.Engine.from_pretrained("tiny", device="cpu")
    try:
        cs = ev.concept_set("sparkle", 0)
        n = 32

        def fidelity(phrase, adapters):
            reqs = [impasto.Request(t.format(phrase), adapters=adapters, seed=s, steps=10, guidance=7.5)
                    for (t, _), s in zip(cs.templates[:n], cs.seeds[:n])]
            images = [o.images[0] for o in eng.generate_batch(reqs)]
            pf = ev.prompt_fidelity(images, cs.prompts(cs.class_word)[:n], attributes=ev.CONTEXT_ATTRIBUTES)
            return ev.concept_accuracy(images, "sparkle"), pf["overall"]

        base, base_pf = fidelity(cs.class_word, [])
        r = perfusion(eng, cs.images, captions=cs.reference_captions("{placeholder}"), super_word=cs.class_word,
                      steps=QUALITY_STEPS, output=tmp_path / "sparkle", progress=False)
        eng.adapters.register("sparkle", r.files["rank1"])
        trained, trained_pf = fidelity(PH, [impasto.Adapter("sparkle", **QUALITY_GATE)])
    finally:
        eng.close()
        torch.set_num_threads(threads)
    assert trained_pf >= base_pf - 0.1, (base_pf, trained_pf)
    assert trained >= base + 0.25, (base, trained)
