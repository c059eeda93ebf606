"""Perfusion (`rank1`) adapters served through the plan, equal to an independent reference: a
diffusers pipeline whose attn2 to_k/to_v compute the paper's equations (`perfusion_h`) at the
prompt's positions up to its EOS and W e on the padding after it, and whose tokenizer learned the
placeholder by `load_textual_inversion`."""

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
    """h(e) at the positions `edited` marks (Shape [B, 77] bool, set per call), W e elsewhere."""

    def __init__(self, W, concepts, which, C_inv, edited=None):
        super().__init__()
        self.W, self.C_inv, self.edited = W, C_inv, edited
        self.i = torch.stack([c["i_star"] for c in concepts])
        self.o = torch.stack([c["o"][which] for c in concepts])
        self.betas, self.taus = [c["beta"] for c in concepts], [c["tau"] for c in concepts]

    def forward(self, e):
        h = perfusion_h(e, self.W, self.i, self.o, self.betas, self.taus, self.C_inv).to(e.dtype)
        if self.edited is None:
            return h
        return torch.where(self.edited[..., None], h, e @ self.W.T)


def edited_positions(tokenizer, texts, edit_eos=None):
    """Shape [B, 77] bool: BOS, the text's tokens and (edit_eos) its EOS, from the tokenizer's
    unpadded ids (one 77-token chunk); False on the padding after the EOS."""
    edit_eos = impasto.adapters.families.rank1.EDIT_EOS if edit_eos is None else edit_eos
    n = [len(tokenizer(t, truncation=True, max_length=77).input_ids) - (0 if edit_eos else 1) for t in texts]
    return torch.arange(77)[None, :] < torch.tensor(n)[:, None]


def _reference(tiny_dir, engine, files, prompt, seed, options=None, padding=False):
    """diffusers pipeline with attn2 K/V replaced by the paper's equations, kept off the padding
    after the EOS (padding=True: on every position, as the community code); tokens by textual
    inversion. Classifier-free guidance: rows [negative prompt "", prompt]."""
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
    edited = None if padding else edited_positions(pipe.tokenizer, ["", prompt])
    for name, attn in cross_attention_layers(pipe.unet).items():
        per = [dict(c, o=c["o"][name]) for c in concepts]
        attn.to_k = _Perfusion(attn.to_k.weight.detach(), per, 0, C_inv, edited)
        attn.to_v = _Perfusion(attn.to_v.weight.detach(), per, 1, C_inv, edited)
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
    # The padding is left alone: the same equations on every position (the community code's) differ.
    everywhere = _reference(tiny_dir, eng, [("<teddy>", paths["teddy"])], "a photo of a <teddy> on the grass", 4,
                            padding=True)
    assert _diff(out.images, everywhere) > 10 * TOL  # measured 0.074
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


@pytest.mark.parametrize("edit_eos", [False, True])
def test_edit_stays_off_the_padding(perf, monkeypatch, edit_eos):
    """The planned K/V: exactly the base projection W e at every padding position after a chunk's
    EOS (and at the EOS when EDIT_EOS is off, the default), the paper's h(e) at the prompt's
    positions, for a one-chunk and a two-chunk prompt (each chunk's own EOS) and the global key
    lock's key text."""
    monkeypatch.setattr(impasto.adapters.families.rank1, "EDIT_EOS", edit_eos)
    from impasto.plan import Branch, build_plan
    from impasto.prompts import chunk_prompt, encode_prompts

    eng, _ = perf
    long = " ".join(["red star"] * 40) + " a <teddy>"  # 82 tokens: two chunks
    cases = [("a photo of a <teddy> on the grass", 1, {}), (long, 2, {}),
             ("a photo of a <teddy>", 1, {"global_lock": True})]
    for text, chunks, options in cases:
        opts = tuple(options.items())
        files = {"teddy": eng.adapters.load("teddy")}
        plan = build_plan([Branch(text, (("teddy", 1.0, opts),), chunks)], eng.base, eng.attn2, eng.lora, eng.adapters,
                          files, "cpu", torch.float32)
        pieces = chunk_prompt(eng.base.tokenizer, text, ["<teddy>"])
        assert len(pieces) == chunks
        f = files["teddy"]
        C_inv = eng.adapters.covariance()
        key_text = text.replace("<teddy>", "teddy") if options else text
        key_embeds = plan.embeds
        if options:
            key_embeds = encode_prompts(eng.base.tokenizer, eng.base.text_encoder, [(key_text, chunks, 1, False)],
                                        [{}], "cpu")[0][None]
        for c, piece in enumerate(pieces):
            # the chunk's EOS: BOS + its tokens (a placeholder's unk id is the EOS id: count, do not search)
            ids = eng.base.tokenizer(text.replace("<teddy>", "teddy"), add_special_tokens=False).input_ids
            n_tokens = min(75, len(ids) - 75 * c)
            eos = 77 * c + 1 + n_tokens
            last = eos + (1 if edit_eos else 0)
            for name, attn in eng.attn2.items():
                for which, (proj, e) in enumerate(((attn.to_k, key_embeds), (attn.to_v, plan.embeds))):
                    got = plan.kv[name][which][0]
                    with torch.inference_mode():
                        plain = proj(e[0])
                    span = slice(77 * c, 77 * (c + 1))
                    h = perfusion_h(e[0, span], proj.weight, f.i_star[None], f.layers[name][which][None], [f.beta],
                                    [f.tau], C_inv)
                    assert torch.equal(got[last:77 * (c + 1)], plain[last:77 * (c + 1)]), (text, name, which)
                    assert float((got[span][: last - 77 * c] - h[: last - 77 * c]).abs().max()) <= 1e-4, (text, name)
                    assert float((got[span][: last - 77 * c] - plain[span][: last - 77 * c]).abs().max()) > 1e-3
