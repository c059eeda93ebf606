"""Serving LoRA adapters per row in one batched UNet forward, equal to diffusers+PEFT.

Every adapter file here is written by its tool's own code; the reference image is diffusers'
pipeline with the same adapters active through PEFT (`set_adapters` / `disable_adapters`).
"""

import hashlib
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

import impasto
from test_generate import generate_counting_rows

TOL = 1e-3
STEPS = 4
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
ALL = ATTN + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
CONFIGS = {
    # name: LoraConfig kwargs. "plain" has scale 1 everywhere, for layouts that drop alpha.
    "plain": dict(r=4, lora_alpha=4, target_modules=ATTN),
    "patterned": dict(r=8, lora_alpha=4, target_modules=ALL, rank_pattern={"ff.net.2": 2},
                      alpha_pattern={"to_k": 16}),
    "rslora": dict(r=16, lora_alpha=8, target_modules=ATTN + ["proj_in"], use_rslora=True),
    "second": dict(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ff.net.2"]),
}


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def peft_unet(tiny_dir):
    """The base UNet with every adapter of CONFIGS added through PEFT, random non-zero weights."""
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    for i, (name, kw) in enumerate(CONFIGS.items()):
        torch.manual_seed(100 + i)
        unet.add_adapter(LoraConfig(init_lora_weights=False, **kw), adapter_name=name)
    with torch.no_grad():  # rank 4 at scale 1 is too weak to move the image 100x the tolerance
        for n, p in unet.named_parameters():
            if "lora_B.plain" in n:
                p.mul_(2.0)
    return unet


@pytest.fixture(scope="module")
def ref_pipe(tiny_dir, peft_unet):
    p = StableDiffusionPipeline.from_pretrained(tiny_dir, unet=peft_unet, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def reference(ref_pipe, prompt, seed, adapters):
    """diffusers+PEFT on one request: adapters = [(name, weight), ...] or [] (LoRA disabled)."""
    unet = ref_pipe.unet
    if adapters:
        unet.enable_adapters()
        unet.set_adapters([n for n, _ in adapters], [w for _, w in adapters])
    else:
        unet.disable_adapters()
    g = torch.Generator("cpu").manual_seed(seed)
    return ref_pipe(prompt, num_inference_steps=STEPS, generator=g, output_type="np").images


def _peft_sd(unet, name):
    return get_peft_model_state_dict(unet, adapter_name=name)


def write_layout(layout, peft_unet, name, folder):
    """Write adapter `name` as `layout`, with the tool's own code; return the path to register."""
    os.makedirs(folder, exist_ok=True)
    sd = _peft_sd(peft_unet, name)
    cfg = peft_unet.peft_config[name]
    if layout == "diffusers-old":  # training scripts: convert_state_dict_to_diffusers, no alpha
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(sd))
        return os.path.join(folder, "pytorch_lora_weights.safetensors")
    if layout == "diffusers":  # lora_A/lora_B with alpha in lora_adapter_metadata
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=sd,
                                                  unet_lora_adapter_metadata=cfg.to_dict())
        return os.path.join(folder, "pytorch_lora_weights.safetensors")
    if layout == "diffusers-adapter":  # unet.save_lora_adapter: no unet. prefix
        peft_unet.save_lora_adapter(folder, adapter_name=name)
        return os.path.join(folder, "pytorch_lora_weights.safetensors")
    if layout == "peft":  # PeftModel.save_pretrained: adapter_model.safetensors + adapter_config.json
        fresh = UNet2DConditionModel.from_config(peft_unet.config)
        model = get_peft_model(fresh, LoraConfig(**{k: v for k, v in cfg.to_dict().items()
                                                     if k in ("r", "lora_alpha", "target_modules",
                                                              "rank_pattern", "alpha_pattern", "use_rslora")}))
        missing = model.load_state_dict({"base_model.model." + k.replace(".lora_A.weight", ".lora_A.default.weight")
                                         .replace(".lora_B.weight", ".lora_B.default.weight"): v
                                         for k, v in sd.items()}, strict=False)
        assert not missing.unexpected_keys
        model.save_pretrained(folder)
        return folder
    if layout == "kohya":  # kohya names: lora_unet_<module with . -> _>.lora_down/.lora_up/.alpha
        out = {}
        for key, value in sd.items():
            module, _, kind = key.rpartition(".lora_")
            kohya = "lora_unet_" + module.replace(".", "_")
            if kind == "A.weight":
                out[kohya + ".lora_down.weight"] = value.contiguous()
                alpha = cfg.lora_alpha
                for pat, a in cfg.alpha_pattern.items():
                    if module.endswith(pat):
                        alpha = a
                out[kohya + ".alpha"] = torch.tensor(float(alpha))
            else:
                out[kohya + ".lora_up.weight"] = value.contiguous()
        path = os.path.join(folder, f"{name}.safetensors")
        safetensors.torch.save_file(out, path)
        return path
    raise ValueError(layout)


@pytest.fixture(scope="module")
def lora_engine(tiny_dir, peft_unet, tmp_path_factory):
    eng = impasto.Engine.from_pretrained(tiny_dir, max_adapters_per_row=3)
    root = tmp_path_factory.mktemp("loras")
    for name, layout in (("plain", "diffusers-old"), ("patterned", "diffusers"), ("rslora", "peft"),
                         ("second", "kohya")):
        eng.adapters.register(name, write_layout(layout, peft_unet, name, str(root / name)))
    return eng


@pytest.mark.parametrize(
    "layout, name",
    [("diffusers-old", "plain"), ("diffusers", "patterned"), ("diffusers-adapter", "patterned"),
     ("peft", "patterned"), ("peft", "rslora"), ("kohya", "patterned"), ("kohya", "second")],
)
def test_every_layout_equals_diffusers_peft(tiny_dir, peft_unet, ref_pipe, tmp_path, layout, name):
    eng = impasto.Engine.from_pretrained(tiny_dir)
    info = eng.adapters.register("x", write_layout(layout, peft_unet, name, str(tmp_path / layout)))
    assert info.format == layout and info.family == "lora"
    assert len(info.targets) == sum(1 for k in _peft_sd(peft_unet, name) if "lora_A" in k)
    out = eng.generate("a red star", adapters=["x"], steps=STEPS, seed=3, output_type="np").images
    ref = reference(ref_pipe, "a red star", 3, [(name, 1.0)])
    assert _diff(out, ref) <= TOL
    base = reference(ref_pipe, "a red star", 3, [])
    assert _diff(ref, base) > 100 * TOL, "the adapter must change the image, or this test cannot fail"


def test_mixed_batch_one_forward_equals_solo_and_diffusers(lora_engine, ref_pipe):
    eng = lora_engine
    cases = [
        (["patterned"], [("patterned", 1.0)]),
        (["second", ("plain", 0.7)], [("second", 1.0), ("plain", 0.7)]),
        ([], []),
        ([("patterned", 0.5), "rslora", ("second", -0.8)], [("patterned", 0.5), ("rslora", 1.0), ("second", -0.8)]),
        ([impasto.Adapter("rslora", scale=1.3)], [("rslora", 1.3)]),
    ]
    reqs = [impasto.Request(f"prompt {i}", adapters=a, seed=10 + i, steps=STEPS, output_type="np")
            for i, (a, _) in enumerate(cases)]
    outs, calls = generate_counting_rows(eng, reqs)
    assert calls == [2 * len(reqs)] * STEPS
    for req, out, (_, ref_adapters) in zip(reqs, outs, cases):
        assert out.error is None
        assert _diff(out.images, eng.generate_batch([req])[0].images) <= TOL
        assert _diff(out.images, reference(ref_pipe, req.prompt, req.seed, ref_adapters)) <= TOL


def test_requests_sharing_a_lora_are_adjacent_one_matmul_pair_each(lora_engine, monkeypatch):
    """Interleaved requests for two adapters: the step orders them so that each adapter's rows
    form one run (two runs per hooked projection, not one per request; where a row has no adapter
    the CPU path computes a matmul pair per run), and each request still gets its own image back,
    equal to generating it alone."""
    from impasto.kernels import dispatch
    from impasto.kernels import lora as lora_kernels

    runs, in_step = [], []  # runs of rows per call inside the UNet forward (the plan's attn2 K/V run once)
    impls = dispatch._REGISTRY["lora_apply"]
    reference = impls[dispatch.Backend.REFERENCE]

    def counting(y, x, A, B, slots, *rest):
        if in_step:
            runs.append(len(lora_kernels._segments(slots)))
        return reference(y, x, A, B, slots, *rest)

    monkeypatch.setitem(impls, dispatch.Backend.REFERENCE, counting)
    unet = lora_engine.base.unet
    hooks = [unet.register_forward_pre_hook(lambda m, a: in_step.append(1)),
             unet.register_forward_hook(lambda m, a, o: in_step.clear())]
    names = ["plain", "second", "plain", "second"]
    reqs = [impasto.Request(f"prompt {i}", adapters=[n], seed=20 + i, steps=STEPS, output_type="np")
            for i, n in enumerate(names)]
    try:
        outs, calls = generate_counting_rows(lora_engine, reqs)
    finally:
        for h in hooks:
            h.remove()
    assert calls == [2 * len(reqs)] * STEPS
    assert runs and set(runs) == {2}, "two adapters: two runs of rows per projection, not one per request"
    monkeypatch.setitem(impls, dispatch.Backend.REFERENCE, reference)
    for req, out in zip(reqs, outs):
        assert out.error is None
        assert _diff(out.images, lora_engine.generate_batch([req])[0].images) <= TOL


def test_base_weights_never_modified(lora_engine):
    def digest():
        h = hashlib.sha256()
        for k, v in sorted(lora_engine.base.unet.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    before = digest()
    lora_engine.generate("a star", adapters=["patterned", ("second", 0.5)], steps=2, seed=0)
    assert digest() == before


def test_too_many_adapters_is_a_request_error(lora_engine):
    with pytest.raises(impasto.RequestError, match="max_adapters_per_row"):
        lora_engine.generate("a", adapters=["plain", "patterned", "rslora", "second"], steps=1)


def test_slot_pressure_splits_the_batch_and_stays_equal(tiny_dir, lora_engine, peft_unet, tmp_path):
    eng = impasto.Engine.from_pretrained(tiny_dir, slots_per_bucket=1)
    for name, layout in (("plain", "diffusers-old"), ("second", "kohya")):  # both rank 4: one bucket
        eng.adapters.register(name, write_layout(layout, peft_unet, name, str(tmp_path / name)))
    reqs = [impasto.Request("a", adapters=[n], seed=1, steps=STEPS, output_type="np") for n in ("plain", "second")]
    outs = eng.generate_batch(reqs)
    for req, out in zip(reqs, outs):
        assert _diff(out.images, lora_engine.generate_batch([req])[0].images) <= TOL


def _text_encoder_lora(path):
    safetensors.torch.save_file({
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
    }, path)


def test_registration_refusals(tiny_dir, tmp_path, peft_unet):
    eng = impasto.Engine.from_pretrained(tiny_dir, max_rank=8)
    te = str(tmp_path / "te.safetensors")
    _text_encoder_lora(te)
    with pytest.raises(impasto.AdapterUnsupportedError, match="second text encoder"):
        eng.adapters.register("te", te)  # SDXL's text_encoder_2: this base has one text encoder
    big = write_layout("diffusers", peft_unet, "rslora", str(tmp_path / "big"))  # rank 16 > max_rank 8
    with pytest.raises(impasto.AdapterValueError, match="max_rank"):
        eng.adapters.register("big", big)
    wrong = str(tmp_path / "wrong.safetensors")  # a 64-wide layer where the base has 32
    safetensors.torch.save_file({
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 64),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4),
    }, wrong)
    with pytest.raises(impasto.AdapterShapeError, match="attn1.to_q"):
        eng.adapters.register("wrong", wrong)
    ok = write_layout("diffusers", peft_unet, "plain", str(tmp_path / "ok"))
    eng.adapters.register("ok", ok)
    with pytest.raises(impasto.AdapterNameError, match="already registered"):
        eng.adapters.register("ok", ok)
    with pytest.raises(impasto.AdapterNameError):
        eng.adapters.register("bad/name", ok)
    eng.adapters.unregister("ok")
    with pytest.raises(impasto.AdapterNameError):
        eng.generate("a", adapters=["ok"], steps=1)
