"""Pair Customization style guidance: every branch of every request in ONE UNet forward per step,
equal to the official way — one diffusers+PEFT UNet call per branch with `set_adapters`."""


import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig, get_peft_model_state_dict

import impasto
from test_generate import generate_counting_rows

STEPS = 4
TOL = 1e-3
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
STYLES = {"wc": "in watercolor style", "sk": "as a pencil sketch", "px": None}


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """Style LoRAs as Pair Customization's save_lora_weights writes them (q/k/v/out of every
    attention, no alpha: scale 1), one plain LoRA, and the diffusers+PEFT UNet holding them all."""
    d = tmp_path_factory.mktemp("styles")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    for i, name in enumerate([*STYLES, "plain"]):
        torch.manual_seed(200 + i)
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=ATTN, init_lora_weights=False), adapter_name=name)
        StableDiffusionPipeline.save_lora_weights(str(d / name), unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=name))
    # "px" carries its suffix in the file's metadata instead of at registration
    px = str(d / "px" / "pytorch_lora_weights.safetensors")
    tensors = safetensors.torch.load_file(px)
    meta = dict(safetensors.safe_open(px, "pt").metadata() or {})
    safetensors.torch.save_file(tensors, px, metadata={**meta, "impasto.style_suffix": "in pixel art"})
    eng = impasto.Engine.from_pretrained(tiny_dir)
    for name, suffix in STYLES.items():
        eng.adapters.register(name, str(d / name / "pytorch_lora_weights.safetensors"), family="style", suffix=suffix)
    eng.adapters.register("plain", str(d / "plain" / "pytorch_lora_weights.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, unet=unet, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return eng, pipe


def reference(pipe, prompt, *, seed, cfg, styles=(), base=(), negative="", rescale=0.0):
    """The official pipeline's loop: uncond+cond in one call with the base adapters, then one UNet
    call per style with base + that style LoRA (scale 1) on `prompt + " " + suffix`."""
    unet, sched = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    enc = lambda text: pipe.encode_prompt(text, "cpu", 1, False)[0]  # noqa: E731

    def use(adapters):
        if adapters:
            unet.enable_adapters()
            unet.set_adapters([n for n, _ in adapters], [w for _, w in adapters])
        else:
            unet.disable_adapters()

    e_uc = torch.cat([enc(negative), enc(prompt)])
    e_styles = [enc(prompt + (" " + suffix if suffix else "")) for _, _, suffix in styles]
    lat = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            use(list(base))
            x = sched.scale_model_input(lat, t)
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=e_uc).sample.chunk(2)
            e = e_u + cfg * (e_c - e_u)
            for (name, w, _), emb in zip(styles, e_styles):
                use(list(base) + [(name, 1.0)])
                e = e + w * (unet(x, t, encoder_hidden_states=emb).sample - e_c)
            if rescale > 0:
                e = rescale_noise_cfg(e, e_c, guidance_rescale=rescale)
            lat = sched.step(e, t, lat).prev_sample
        image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


def test_mixed_styles_one_forward_equal_official_loop(setup):
    eng, pipe = setup
    cases = [
        (dict(guidance=7.5), dict(cfg=7.5)),
        (dict(guidance=impasto.Guidance(cfg=5.0, styles={"wc": 4.0})), dict(cfg=5.0, styles=[("wc", 4.0, STYLES["wc"])])),
        (dict(guidance=impasto.Guidance(cfg=7.5, styles={"wc": 2.0, "sk": 3.0, "px": 1.5}, rescale=0.5),
              negative_prompt="blurry"),
         dict(cfg=7.5, styles=[("wc", 2.0, STYLES["wc"]), ("sk", 3.0, STYLES["sk"]), ("px", 1.5, "in pixel art")],
              rescale=0.5, negative="blurry")),
        (dict(guidance=impasto.Guidance(cfg=6.0, styles={"sk": 4.0}), adapters=[("plain", 0.8)]),
         dict(cfg=6.0, styles=[("sk", 4.0, STYLES["sk"])], base=[("plain", 0.8)])),
    ]
    reqs = [impasto.Request(f"a dog number {i}", seed=20 + i, steps=STEPS, output_type="np", **kw)
            for i, (kw, _) in enumerate(cases)]
    outs, rows = generate_counting_rows(eng, reqs)
    assert rows == [2 + 3 + 5 + 3] * STEPS  # every branch of every request, one forward per step
    for req, out, (_, ref_kw) in zip(reqs, outs, cases):
        assert out.error is None, out.error
        ref = reference(pipe, req.prompt, seed=req.seed, **ref_kw)
        assert _diff(out.images, ref) <= TOL
        if ref_kw.get("styles"):  # the styles move the image, so this test can fail
            plain = reference(pipe, req.prompt, seed=req.seed, **{**ref_kw, "styles": ()})
            assert _diff(ref, plain) > 100 * TOL


def test_style_rules(setup):
    eng, _ = setup
    with pytest.raises(impasto.AdapterError, match="guidance.styles"):
        eng.generate("a dog", adapters=["wc"], steps=1)
    with pytest.raises(impasto.AdapterError, match="not a style adapter"):
        eng.generate("a dog", guidance=impasto.Guidance(styles={"plain": 1.0}), steps=1)
    with pytest.raises(impasto.AdapterNameError, match="nope"):
        eng.generate("a dog", guidance=impasto.Guidance(styles={"nope": 1.0}), steps=1)
    assert eng.adapters.info("px").suffix == "in pixel art"


def test_content_leakage_counts_the_pairs_colour_alone():
    """A style that repaints held-out objects in the pair's colour leaks through colour alone:
    `leakage` (shape AND colour) misses it, `colour_leakage` and `any_leakage` count it."""
    from impasto import eval as ev
    from impasto.tiny import world

    rng = np.random.default_rng(5)

    def draw(shape, colour, n=10):
        return np.stack([world.render(world.sample_scene(rng, shape=shape, colour=colour, count=1, size="large",
                                                         background="white", style="flat"), rng) for _ in range(n)])

    pair = ("heart", "green")
    ask = "a blue square on a white background"
    green_squares, red_hearts, blue_squares = draw("square", "green"), draw("heart", "red"), draw("square", "blue")
    g = ev.content_leakage(green_squares, ask, pair)
    assert g["leakage"] <= 0.1 and g["colour_leakage"] >= 0.9 and g["any_leakage"] >= 0.9 and g["shape_leakage"] <= 0.1
    h = ev.content_leakage(red_hearts, ask, pair)
    assert h["shape_leakage"] >= 0.9 and h["colour_leakage"] <= 0.1 and h["any_leakage"] >= 0.9
    b = ev.content_leakage(blue_squares, ask, pair)
    assert max(b["leakage"], b["shape_leakage"], b["colour_leakage"], b["any_leakage"]) <= 0.1
    assert (g["n"], g["n_shape"], g["n_colour"], g["n_any"]) == (10, 10, 10, 10)
    # a prompt naming no colour is not scored for colour; one naming the pair's colour not for it either
    s = ev.content_leakage(green_squares, ["a square on a white background"] * 5 + ["a green circle on a white background"] * 5, pair)
    assert s["n_colour"] == 0 and s["n_shape"] == 10 and s["shape_leakage"] <= 0.1 and s["any_leakage"] <= 0.1
