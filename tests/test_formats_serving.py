"""The shared-file layouts served by the engine: LoHa / LoCon / DoRA next to plain LoRA, kv and
rank1 in one batch, and textual-inversion embeddings, each equal to diffusers (+PEFT).

References: diffusers' pipeline with the adapter injected by PEFT (`get_peft_model` on the
pipeline's own UNet, the file written by `save_pretrained`), diffusers' kohya conversion
(`load_lora_weights`) for kohya LoCon, and `load_textual_inversion` for embeddings.
"""

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoHaConfig, LoraConfig, get_peft_model
from safetensors.torch import save_file

import impasto
from test_kv_serving import custom_diffusion
from test_rank1_serving import CAPTIONS, _concept

STEPS = 3
TOL = 1e-3


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _pipe(tiny_dir, unet=None):
    kw = {"unet": unet} if unet is not None else {}
    p = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True, **kw)
    p.set_progress_bar_config(disable=True)
    return p


def _run(pipe, prompt, seed, negative=None):
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, negative_prompt=negative, num_inference_steps=STEPS, generator=g, output_type="np").images


def _peft_unet(tiny_dir, config, folder, seed):
    """The tiny UNet with `config` injected by PEFT, random factors, saved by save_pretrained."""
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    model = get_peft_model(unet, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            elif any(k in n for k in ("hada_", "lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(folder)
    return unet  # the same object, now carrying the adapter


@pytest.fixture(scope="module")
def shared(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root))
    refs = {}
    refs["loha"] = _peft_unet(tiny_dir, LoHaConfig(r=4, alpha=4, target_modules=["to_q", "to_v", "conv1", "ff.net.2"],
                                                   init_weights=False), root / "loha", seed=1)
    refs["dora"] = _peft_unet(tiny_dir, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "conv2", "proj_out"],
                                                   use_dora=True, init_lora_weights=False), root / "dora", seed=2)
    refs["locon"] = _peft_unet(tiny_dir, LoraConfig(r=4, lora_alpha=8, target_modules=["conv1", "conv2", "to_out.0"],
                                                    init_lora_weights=False), root / "locon", seed=3)
    for name in refs:
        eng.adapters.register(name, str(root / name))
    return eng, root, refs


@pytest.mark.parametrize("name", ["loha", "dora", "locon"])
def test_layout_equals_diffusers_peft(tiny_dir, shared, name):
    eng, _, refs = shared
    info = eng.adapters.info(name)
    assert info.family == "lora" and info.format == "peft" and info.nbytes > 0 and info.rank == 4
    req = impasto.Request("a red circle on grass", adapters=[name], seed=7, steps=STEPS, output_type="np")
    out = eng.generate_batch([req])[0]
    assert out.error is None, out.error
    ref = _run(_pipe(tiny_dir, refs[name]), "a red circle on grass", 7)
    base = _run(_pipe(tiny_dir), "a red circle on grass", 7)
    assert _diff(out.images, ref) <= TOL
    assert _diff(ref, base) > 10 * TOL  # the adapter changes the image: the equality can fail


def test_variants_mixed_with_plain_lora_kv_rank1_in_one_batch(tiny_dir, shared):
    eng, root, _ = shared
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False), adapter_name="l")
    from peft import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(str(root / "l"), unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="l"))
    eng.adapters.register("plain", str(root / "l" / "pytorch_lora_weights.safetensors"))
    custom_diffusion(tiny_dir, str(root / "cd"), seed=3)
    eng.adapters.register("cd", str(root / "cd"), token="<cd>")
    eng.adapters.compute_covariance(eng.base.tokenizer, eng.base.text_encoder, CAPTIONS[:60])
    eng.adapters.register("perf", _concept(eng, 4, "<p>", "teddy", root))
    reqs = [
        impasto.Request("a <cd> on grass", adapters=["loha", "cd"], seed=1),
        impasto.Request("a <p>", adapters=["perf", ("dora", 0.6)], seed=2),
        impasto.Request("a blue square", adapters=[("locon", 1.3), "plain"], seed=3),
        impasto.Request("a blue square", adapters=[("loha", 0.5), ("dora", 1.0)], seed=3),
        impasto.Request("a plain red star", seed=4),
    ]
    reqs = [impasto.Request(r.prompt, adapters=r.adapters, seed=r.seed, steps=STEPS, output_type="np") for r in reqs]
    outs = eng.generate_batch(reqs)
    for req, out in zip(reqs, outs):
        assert out.error is None, out.error
        solo = eng.generate_batch([req])[0]
        assert _diff(out.images, solo.images) <= TOL
    assert _diff(outs[2].images, outs[3].images) > 10 * TOL


def test_compile_mode_refuses_variants_at_registration(tiny_dir, shared):
    _, root, _ = shared
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root), compile="eager")
    with pytest.raises(impasto.AdapterUnsupportedError, match="compile mode") as e:
        eng.adapters.register("loha", str(root / "loha"))
    assert "hada_w1_a" in str(e.value)
    eng.close()


# --- textual inversion ----------------------------------------------------------------------------


def _embeddings(tmp, dim):
    g = torch.Generator().manual_seed(0)
    vec = lambda n: torch.randn(n, dim, generator=g) * 0.5  # noqa: E731
    a1111 = os.path.join(tmp, "easyneg.pt")  # A1111's .pt, three vectors
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec(3)}, "name": "easyneg", "step": 100,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, a1111)
    st = os.path.join(tmp, "shiny.safetensors")  # A1111's safetensors
    save_file({"emb_params": vec(1)}, st)
    learned = os.path.join(tmp, "learned_embeds.safetensors")  # diffusers' textual_inversion.py, two vectors
    save_file({"<toy>": vec(2)}, learned)
    return {"easyneg": a1111, "shiny": st, "<toy>": learned}


def test_textual_inversion_equals_load_textual_inversion(tiny_dir, tmp_path):
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(tmp_path))
    dim = eng.base.text_encoder.get_input_embeddings().weight.shape[1]
    paths = _embeddings(str(tmp_path), dim)
    assert eng.adapters.register("neg", paths["easyneg"]).token == "easyneg"  # the file's own name
    info = eng.adapters.register("shiny", paths["shiny"], token="shinyx")
    assert (info.family, info.format, info.rank) == ("embedding", "a1111-safetensors", 1)
    assert eng.adapters.register("toy", paths["<toy>"]).token == "<toy>"
    ref = _pipe(tiny_dir)
    ref.load_textual_inversion(paths["easyneg"], token="easyneg")
    ref.load_textual_inversion(paths["shiny"], token="shinyx")
    ref.load_textual_inversion(paths["<toy>"])
    prompt, negative = "a <toy> on grass, shinyx", "easyneg, blurry"
    reqs = [impasto.Request(prompt, negative_prompt=negative, seed=5, steps=STEPS, output_type="np"),
            impasto.Request(prompt, negative_prompt=negative, adapters=["neg"], seed=5, steps=STEPS, output_type="np"),
            impasto.Request("a red square", negative_prompt="easynegative", seed=6, steps=STEPS, output_type="np")]
    outs = eng.generate_batch(reqs)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    expect = _run(ref, prompt, 5, negative)
    assert _diff(outs[0].images, expect) <= TOL
    assert _diff(outs[1].images, outs[0].images) <= TOL  # naming it changes nothing
    # "easynegative" is another word: nothing is injected, as in the base pipeline
    assert _diff(outs[2].images, _run(_pipe(tiny_dir), "a red square", 6, "easynegative")) <= TOL
    assert _diff(expect, _run(_pipe(tiny_dir), "a <toy> on grass, shinyx", 5, "blurry")) > 10 * TOL


def test_textual_inversion_refusals(tiny_dir, tmp_path):
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(tmp_path))
    dim = eng.base.text_encoder.get_input_embeddings().weight.shape[1]
    paths = _embeddings(str(tmp_path), dim)
    with pytest.raises(impasto.AdapterNameError, match="vocabulary"):
        eng.adapters.register("red", paths["shiny"], token="red")
    with pytest.raises(impasto.AdapterNameError, match="names no token"):
        eng.adapters.register("shiny", paths["shiny"])
    eng.adapters.register("neg", paths["easyneg"])
    with pytest.raises(impasto.AdapterNameError, match="already adapter 'neg'"):
        eng.adapters.register("neg2", paths["easyneg"])
    wrong = os.path.join(str(tmp_path), "wide.safetensors")
    save_file({"emb_params": torch.zeros(2, dim + 1)}, wrong)
    with pytest.raises(impasto.AdapterShapeError, match="width"):
        eng.adapters.register("wide", wrong, token="widex")
    nan = os.path.join(str(tmp_path), "nan.safetensors")
    save_file({"emb_params": torch.full((1, dim), float("nan"))}, nan)
    with pytest.raises(impasto.AdapterValueError, match="NaN"):
        eng.adapters.register("nan", nan, token="nanx")
