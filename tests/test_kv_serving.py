"""Custom Diffusion (`kv`) adapters served through the plan, equal to diffusers with
CustomDiffusionAttnProcessor2_0 on every attention layer and the token from load_textual_inversion."""

import copy
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from safetensors.torch import save_file

import impasto

STEPS = 4
TOL = 1e-3
WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def custom_diffusion_processors(unet, kv_state, q_out=False):
    """CustomDiffusionAttnProcessor2_0 on every attention layer as train_custom_diffusion.py sets
    them up (attn1 with train_kv=False; attn2 with train_q_out=q_out, --freeze_model crossattn);
    kv_state(name, attn) gives each attn2 processor's state dict (called after the processor is built)."""
    procs = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                          hidden_size=attn.to_q.out_features)
            continue
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=q_out, hidden_size=attn.to_k.out_features,
                                               cross_attention_dim=attn.to_k.in_features)
        proc.load_state_dict(kv_state(name, attn))
        procs[name] = proc
    return procs


def custom_diffusion(tiny_dir, folder, seed, scale=0.3, q_out=False):
    """A fine-tune as train_custom_diffusion.py leaves it: processors on every attention layer
    (attn1 with train_kv=False), saved by diffusers' save_attn_procs, the token by save_new_embed.
    q_out=True: --freeze_model crossattn (to_q and to_out.0, weight and bias, fine-tuned too)."""
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(seed)

    def perturbed(name, attn):
        with torch.no_grad():
            ws = [("to_k", attn.to_k.weight), ("to_v", attn.to_v.weight)]
            if q_out:
                ws += [("to_q", attn.to_q.weight), ("to_out", attn.to_out[0].weight)]
            state = {f"{p}_custom_diffusion{'.0' if p == 'to_out' else ''}.weight": w + scale * torch.randn_like(w)
                     for p, w in ws}
            if q_out:
                b = attn.to_out[0].bias
                state["to_out_custom_diffusion.0.bias"] = b + scale * torch.randn_like(b)
            return state

    procs = custom_diffusion_processors(unet, perturbed, q_out)
    unet.set_attn_processor(procs)
    os.makedirs(folder, exist_ok=True)
    unet.save_attn_procs(folder, weight_name=WEIGHTS, safe_serialization=True)
    tok = torch.randn(unet.config.cross_attention_dim)
    save_file({"<new1>": tok}, os.path.join(folder, "<new1>.safetensors"), metadata={"format": "pt"})
    return unet


def reference(tiny_dir, cd_unet, folder, prompt, seed, token="<new1>"):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, unet=copy.deepcopy(cd_unet), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(os.path.join(folder, "<new1>.safetensors"), token=token)
    return pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


@pytest.fixture(scope="module")
def cd(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cd")
    a = custom_diffusion(tiny_dir, str(d / "corgi"), seed=1)
    b = custom_diffusion(tiny_dir, str(d / "teapot"), seed=2)
    eng = impasto.Engine.from_pretrained(tiny_dir)
    info = eng.adapters.register("corgi", str(d / "corgi"))
    eng.adapters.register("teapot", str(d / "teapot"), token="<teapot>")
    return eng, d, a, b, info


def test_custom_diffusion_equals_diffusers(tiny_dir, cd, pipe):
    eng, d, a, b, info = cd
    assert info.family == "kv" and info.format == "diffusers" and info.token == "<new1>"
    out = eng.generate("a photo of a <new1> dog", adapters=["corgi"], steps=STEPS, seed=3, output_type="np").images
    ref = reference(tiny_dir, a, str(d / "corgi"), "a photo of a <new1> dog", 3)
    assert _diff(out, ref) <= TOL
    base = pipe("a photo of a dog", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                output_type="np").images
    assert _diff(ref, base) > 100 * TOL


def _batch_equals_solo(eng, reqs):
    """The batch's outputs, each checked equal to its request generated alone."""
    outs = eng.generate_batch(reqs)
    for req, out in zip(reqs, outs):
        assert out.error is None, out.error
        assert _diff(out.images, eng.generate_batch([req])[0].images) <= TOL
    return outs


def test_renamed_token_mixed_batch(tiny_dir, cd):
    eng, d, a, b, _ = cd
    reqs = [
        impasto.Request("a photo of a <new1> dog", adapters=["corgi"], seed=3, steps=STEPS, output_type="np"),
        impasto.Request("a <teapot> on a table", adapters=["teapot"], seed=4, steps=STEPS, output_type="np"),
        impasto.Request("a <new1> next to a <teapot>", adapters=["corgi", ("teapot", 0.5)], seed=5, steps=STEPS,
                        output_type="np"),
        impasto.Request("a plain image", seed=6, steps=STEPS, output_type="np"),
    ]
    outs = _batch_equals_solo(eng, reqs)
    ref = reference(tiny_dir, b, str(d / "teapot"), "a <teapot> on a table", 4, token="<teapot>")
    assert _diff(outs[1].images, ref) <= TOL


def test_compress_full_rank_is_lossless_and_low_rank_is_not(tiny_dir, cd, tmp_path):
    eng, d, a, _, _ = cd
    full = eng.adapters.compress_kv("corgi", tmp_path / "full.safetensors", rank=32)
    low = eng.adapters.compress_kv("corgi", tmp_path / "low.safetensors", rank=1)
    assert all(r == (32, 32) for r in full["ranks"].values()) and low["bytes"] < full["bytes"]
    eng.adapters.register("corgi-full", full["path"])
    eng.adapters.register("corgi-low", low["path"])
    assert eng.adapters.info("corgi-full").format == "kv"
    prompt = "a photo of a <new1> dog"
    outs = [eng.generate(prompt, adapters=[n], steps=STEPS, seed=3, output_type="np").images
            for n in ("corgi", "corgi-full", "corgi-low")]
    assert _diff(outs[0], outs[1]) <= 5 * TOL  # fp16 factors
    assert _diff(outs[0], outs[2]) > 10 * TOL
    rule = eng.adapters.compress_kv("corgi", tmp_path / "rule.safetensors")
    assert all(0 <= rk <= 32 and 0 <= rv <= 32 for rk, rv in rule["ranks"].values())


def test_merge_registers_a_working_adapter(cd, tmp_path):
    eng, *_ = cd
    words = "red green blue yellow star circle square heart white black photo small dog cat of a on the".split()
    captions = [" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(4 + i % 6)) for i in range(80)]
    info = eng.adapters.merge_kv(["corgi", "teapot"], captions, name="both", categories=["dog", "teapot"],
                                 tokenizer=eng.base.tokenizer, text_encoder=eng.base.text_encoder,
                                 out_path=tmp_path / "both.safetensors")
    assert {p for p, _ in info.token_map} == {"<new1>", "<new2>"}
    out = eng.generate("a <new1> and a <new2>", adapters=["both"], steps=2, seed=1, output_type="np")
    assert np.isfinite(out.images).all()


def test_kv_rules(cd):
    eng, *_ = cd
    with pytest.raises(impasto.AdapterNameError, match="<new1>"):
        eng.generate("a photo of a <new1> dog", steps=1)
    with pytest.raises(impasto.AdapterNameError, match="both define"):
        eng.adapters.register("corgi2", eng.adapters.info("corgi").path)
        eng.generate("a <new1>", adapters=["corgi", "corgi2"], steps=1)


@pytest.fixture(scope="module")
def crossattn(tiny_dir, cd):
    """A --freeze_model crossattn fine-tune (Q, K, V, out of every attn2) registered beside `cd`'s."""
    eng, d, *_ = cd
    unet = custom_diffusion(tiny_dir, str(d / "qout"), seed=7, scale=0.2, q_out=True)
    info = eng.adapters.register("qout", str(d / "qout"), token="<qo>")
    return eng, d, unet, info


def test_crossattn_q_out_equals_diffusers(tiny_dir, crossattn):
    eng, d, unet, info = crossattn
    assert info.family == "kv" and info.format == "diffusers"
    # the Q/out deltas are exact: served Q = W0 x + ΔW x equals diffusers' W' x (fp32)
    file = eng.adapters.load("qout")
    attn = unet.get_submodule(next(iter(file.kv.qout)))
    proc = unet.attn_processors[next(iter(file.kv.qout)) + ".processor"]
    x = torch.randn(2, 5, attn.to_q.in_features)
    name = next(iter(file.kv.qout))
    q = file.variants[name + ".to_q"].tensors["diff"]
    o = file.variants[name + ".to_out.0"].tensors
    with torch.no_grad():
        assert float((attn.to_q(x) + x @ q.t() - proc.to_q_custom_diffusion(x)).abs().max()) <= 1e-5
        got = attn.to_out[0](x) + x @ o["diff"].t() + o["diff_b"]
        assert float((got - proc.to_out_custom_diffusion[0](x)).abs().max()) <= 1e-5
    prompt = "a photo of a <qo> dog"
    out = eng.generate(prompt, adapters=["qout"], steps=STEPS, seed=3, output_type="np").images
    ref = reference(tiny_dir, unet, str(d / "qout"), prompt, 3, token="<qo>")
    assert _diff(out, ref) <= TOL
    # Q/out matter: the same K/V and token without them is far from diffusers' output
    kv_only = copy.deepcopy(unet)
    kv_only.set_attn_processor({n: (CustomDiffusionAttnProcessor2_0(
        train_kv=True, train_q_out=False, hidden_size=p.hidden_size, cross_attention_dim=p.cross_attention_dim)
        if p.train_kv else p) for n, p in unet.attn_processors.items()})
    for n, p in kv_only.attn_processors.items():
        if p.train_kv:
            src = unet.attn_processors[n]
            p.load_state_dict({k: v for k, v in src.state_dict().items() if "to_k" in k or "to_v" in k})
    assert _diff(ref, reference(tiny_dir, kv_only, str(d / "qout"), prompt, 3, token="<qo>")) > 100 * TOL


def test_crossattn_mixed_batch_with_other_adapters(tiny_dir, crossattn, cd):
    eng, d, unet, _ = crossattn
    corgi = cd[2]
    reqs = [
        impasto.Request("a photo of a <qo> dog", adapters=["qout"], seed=3, steps=STEPS, output_type="np"),
        impasto.Request("a photo of a <new1> dog", adapters=["corgi"], seed=3, steps=STEPS, output_type="np"),
        impasto.Request("a <qo> next to a <teapot>", adapters=[("qout", 0.5), "teapot"], seed=5, steps=STEPS,
                        output_type="np"),
        impasto.Request("a plain image", seed=6, steps=STEPS, output_type="np"),
    ]
    outs = _batch_equals_solo(eng, reqs)
    assert _diff(outs[0].images, reference(tiny_dir, unet, str(d / "qout"), reqs[0].prompt, 3, token="<qo>")) <= TOL
    # the K/V-only row beside it gets no Q/out: still diffusers' output for its own adapter
    assert _diff(outs[1].images, reference(tiny_dir, corgi, str(d / "corgi"), reqs[1].prompt, 3)) <= TOL


def test_crossattn_refusals(tiny_dir, crossattn, tmp_path):
    eng, d, *_ = crossattn
    with pytest.raises(impasto.AdapterUnsupportedError, match="to_q / to_out.0"):
        eng.adapters.compress_kv("qout", tmp_path / "q.safetensors")
    fixed = impasto.Engine.from_pretrained(tiny_dir, compile="eager")  # fixed pools: no variant path
    try:
        with pytest.raises(impasto.AdapterUnsupportedError, match="compile mode") as e:
            fixed.adapters.register("qout", str(d / "qout"))
        assert "to_q_custom_diffusion" in str(e.value)
    finally:
        fixed.close()
    # a layer with to_q but no to_out is a broken file, named
    from safetensors.torch import load_file
    state = load_file(str(d / "qout" / WEIGHTS))
    drop = next(k for k in state if k.endswith("to_out_custom_diffusion.0.weight"))
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({k: v for k, v in state.items() if k != drop}, str(bad / WEIGHTS))
    with pytest.raises(impasto.AdapterFormatError, match="no to_out"):
        eng.adapters.register("bad", str(bad))
    # a to_q of the wrong width names the module and the shape
    wide = next(k for k in state if k.endswith("to_q_custom_diffusion.weight"))
    save_file({**state, wide: torch.zeros(state[wide].shape[0], state[wide].shape[1] + 1)}, str(bad / WEIGHTS))
    with pytest.raises(impasto.AdapterShapeError, match="to_q"):
        eng.adapters.register("bad2", str(bad))
