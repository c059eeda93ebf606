"""Perfusion (`rank1`) adapters served through the plan, equal to an independent reference: a
diffusers pipeline whose attn2 to_k/to_v compute the paper's equations (`perfusion_h`) and whose
tokenizer learned the placeholder by `load_textual_inversion`."""

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline

import impasto
from impasto.adapters.rank1 import fingerprint, perfusion_h, write_rank1
from impasto.attention import cross_attention_layers
from impasto.plan import encode_with_tokens

STEPS = 4
TOL = 1e-3
WORDS = ("red green blue yellow star circle square heart white black photo small large two one dog cat teddy "
         "bear grass beach painting sketch of a on the in with under near old new bright dark").split()
CAPTIONS = [" ".join(WORDS[(i * 7 + j * 13 + i * j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(300)]


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _concept(engine, seed, placeholder, super_word, tmp_path, beta=0.7, tau=0.15):
    """A concept made like Perfusion's: i* = the super word's encoding in context, o*_K locked to
    W_K·e_super, o*_V random; written with impasto's writer."""
    g = torch.Generator().manual_seed(seed)
    te, tok, unet = engine.base.text_encoder, engine.base.tokenizer, engine.base.unet
    dim = te.get_input_embeddings().weight.shape[1]
    token = torch.randn(dim, generator=g)
    pos = 5  # BOS a photo of a <word>
    with torch.no_grad():
        ids = tok(f"a photo of a {super_word}", padding="max_length", max_length=77, return_tensors="pt").input_ids
        e_super = te(ids)[0][0, pos]
        # i*: the placeholder's encoding in context, as Perfusion's EMA converges to
        i_star = encode_with_tokens(tok, te, [f"a photo of a {placeholder}"], [{placeholder: token}], "cpu")[0, pos]
    layers = {}
    for name, attn in cross_attention_layers(unet).items():
        h = attn.to_v.weight.shape[0]
        layers[name] = (attn.to_k.weight.detach() @ e_super, 25.0 * torch.randn(h, generator=g))  # strong, so the test can fail
    path = tmp_path / f"{placeholder.strip('<>')}-{seed}.safetensors"
    write_rank1(path, layers=layers, i_star=i_star, token_embedding=token,
                placeholder=placeholder, super_word=super_word, beta=beta, tau=tau, fingerprint=fingerprint(unet))
    return str(path)


class _Perfusion(torch.nn.Module):
    def __init__(self, W, concepts, which, C_inv):
        super().__init__()
        self.W, self.C_inv = W, C_inv
        self.i = torch.stack([c["i_star"] for c in concepts])
        self.o = torch.stack([c["o"][which] for c in concepts])
        self.betas, self.taus = [c["beta"] for c in concepts], [c["tau"] for c in concepts]

    def forward(self, e):
        return perfusion_h(e, self.W, self.i, self.o, self.betas, self.taus, self.C_inv).to(e.dtype)


def _reference(tiny_dir, engine, files, prompt, seed, options=None):
    """diffusers pipeline with attn2 K/V replaced by the paper's equations; tokens by textual inversion."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    C_inv = engine.adapters.covariance()
    concepts = []
    for (placeholder, path), opt in zip(files, options or [{}] * len(files)):
        t = safetensors.torch.load_file(path)
        meta = safetensors.safe_open(path, "pt").metadata()
        emb = t["token_embedding"]
        safetensors.torch.save_file({placeholder: emb}, path + ".ti")
        pipe.load_textual_inversion(path + ".ti", token=placeholder, weight_name=None)
        concepts.append(dict(i_star=t["i_star"], beta=opt.get("beta", float(meta["impasto.beta"])),
                             tau=opt.get("tau", float(meta["impasto.tau"])),
                             o={name: (t[name + ".to_k.o_star"], t[name + ".to_v.o_star"])
                                for name in cross_attention_layers(pipe.unet)}))
    for name, attn in cross_attention_layers(pipe.unet).items():
        per = [dict(c, o=c["o"][name]) for c in concepts]
        attn.to_k = _Perfusion(attn.to_k.weight.detach(), per, 0, C_inv)
        attn.to_v = _Perfusion(attn.to_v.weight.detach(), per, 1, C_inv)
    return pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


@pytest.fixture(scope="module")
def perf(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root))
    eng.adapters.compute_covariance(eng.base.tokenizer, eng.base.text_encoder, CAPTIONS)
    d = root / "rank1"  # adapters must live inside adapter_root
    d.mkdir()
    paths = {"teddy": _concept(eng, 1, "<teddy>", "teddy", d), "cat": _concept(eng, 2, "<cat1>", "cat", d, beta=0.5, tau=0.2)}
    eng.adapters.register("teddy", paths["teddy"])
    eng.adapters.register("cat", paths["cat"])
    return eng, paths


def test_single_and_multi_concept_equal_paper_reference(tiny_dir, perf):
    eng, paths = perf
    out = eng.generate("a photo of a <teddy> on the grass", adapters=["teddy"], steps=STEPS, seed=4, output_type="np")
    ref = _reference(tiny_dir, eng, [("<teddy>", paths["teddy"])], "a photo of a <teddy> on the grass", 4)
    assert _diff(out.images, ref) <= TOL
    two = eng.generate("a <teddy> and a <cat1>", adapters=[impasto.Adapter("teddy", beta=0.6, tau=0.1), "cat"],
                       steps=STEPS, seed=5, output_type="np")
    ref2 = _reference(tiny_dir, eng, [("<teddy>", paths["teddy"]), ("<cat1>", paths["cat"])],
                      "a <teddy> and a <cat1>", 5, options=[dict(beta=0.6, tau=0.1), {}])
    assert _diff(two.images, ref2) <= TOL
    # The edit matters: textual inversion alone (no K/V edit) gives another image.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(paths["teddy"] + ".ti", token="<teddy>")
    ti_only = pipe("a photo of a <teddy> on the grass", num_inference_steps=STEPS,
                   generator=torch.Generator().manual_seed(4), output_type="np").images
    assert _diff(ref, ti_only) > 100 * TOL


def test_same_placeholder_different_adapters_in_one_batch(tiny_dir, perf, tmp_path):
    eng, paths = perf
    eng.adapters.register("teddy-as-c", paths["teddy"], token="<c>")
    eng.adapters.register("cat-as-c", paths["cat"], token="<c>")
    reqs = [impasto.Request("a photo of a <c>", adapters=[n], seed=7, steps=STEPS, output_type="np")
            for n in ("teddy-as-c", "cat-as-c")]
    outs = eng.generate_batch(reqs)
    for req, out in zip(reqs, outs):
        assert out.error is None
        assert _diff(out.images, eng.generate_batch([req])[0].images) <= TOL
    assert _diff(outs[0].images, outs[1].images) > 100 * TOL
    ref = _reference(tiny_dir, eng, [("<c>", paths["cat"])], "a photo of a <c>", 7)
    assert _diff(outs[1].images, ref) <= TOL


def test_rank1_request_rules(perf):
    eng, _ = perf
    with pytest.raises(impasto.RequestError, match="beta and tau"):
        eng.generate("a <teddy>", adapters=[("teddy", 0.5)], steps=1)
    with pytest.raises(impasto.AdapterNameError, match="<dog7>"):
        eng.generate("a <teddy> and a <dog7>", adapters=["teddy"], steps=1)
    with pytest.raises(impasto.AdapterNameError, match="placeholder"):
        eng.generate("a <teddy>", steps=1)
    eng.adapters.register("teddy2", eng.adapters.info("teddy").path)
    with pytest.raises(impasto.AdapterNameError, match="both define"):
        eng.generate("a <teddy>", adapters=["teddy", "teddy2"], steps=1)
    with pytest.raises(impasto.RequestError, match="unknown rank1 options"):
        eng.generate("a <teddy>", adapters=[impasto.Adapter("teddy", gamma=1)], steps=1)


def test_other_base_model_refused(perf):
    eng, paths = perf
    tmp_path = eng.adapters.root
    t = safetensors.torch.load_file(paths["teddy"])
    meta = dict(safetensors.safe_open(paths["teddy"], "pt").metadata())
    meta["impasto.fingerprint"] = "0123456789abcdef"
    other = f"{tmp_path}/other.safetensors"
    safetensors.torch.save_file(t, other, metadata=meta)
    with pytest.raises(impasto.AdapterShapeError, match="another base model"):
        eng.adapters.register("other", other)
    with pytest.raises(impasto.AdapterPathError, match="outside adapter_root"):
        eng.adapters.register("outside", __file__)
