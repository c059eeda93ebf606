"""Adapters scheduled over steps, `Adapter(name, scale, start=, end=)`: step i of n is active iff
start <= i/n < end. Equal to diffusers with a step-end callback that changes the adapter at those
steps (PEFT set_adapters for a LoRA, the Custom Diffusion processors swapped in and out for kv),
in one batch with unscheduled requests; the same in compile mode without a recompile; refused
where the effect is computed once before the first step."""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig, get_peft_model_state_dict

import impasto
from impasto.errors import RequestError
from test_kv_serving import custom_diffusion
from test_rank1_serving import _concept

STEPS = 5
TOL = 1e-3
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
PROMPT = "a red star on a blue background"
CD_PROMPT = "a photo of a <new1> dog"


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def active(i, start, end, n=STEPS):
    return start <= i / n < end


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory):
    """A LoRA on q/k/v/out of every attention (to_k/to_v of attn2 go into the planned K/V, the
    rest into the row tables) and a Custom Diffusion folder, both registered."""
    d = tmp_path_factory.mktemp("sched")
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(5)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=ATTN, init_lora_weights=False), adapter_name="lo")
    with torch.no_grad():  # strong enough that a step with or without it differs
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.mul_(3.0)
    StableDiffusionPipeline.save_lora_weights(str(d / "lo"), unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="lo"))
    cd_unet = custom_diffusion(tiny_dir, str(d / "cd"), seed=1, scale=0.6)
    return d, cd_unet


def _engine(tiny_dir, d, **kw):
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", **kw)
    eng.adapters.register("lo", str(d / "lo" / "pytorch_lora_weights.safetensors"))
    eng.adapters.register("cd", str(d / "cd"))
    return eng


@pytest.fixture(scope="module")
def eng(tiny_dir, world):
    e = _engine(tiny_dir, world[0])
    yield e
    e.close()


def lora_reference(tiny_dir, d, scale, start, end, seed):
    """diffusers + PEFT, the LoRA's weight set before the first step and changed by
    callback_on_step_end for the next step (the workaround of diffusers#11599)."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(d / "lo"), adapter_name="lo")
    pipe.set_adapters(["lo"], [scale if active(0, start, end) else 0.0])

    def on_step_end(p, i, t, kwargs):
        p.set_adapters(["lo"], [scale if active(i + 1, start, end) else 0.0])
        return kwargs

    return pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np",
                callback_on_step_end=on_step_end).images


def kv_reference(tiny_dir, d, cd_unet, start, end, seed, folder="cd"):
    """diffusers with the Custom Diffusion processors on the steps the adapter is active and
    plain attention on the others (the learned token is in the prompt encoding throughout)."""
    unet = copy.deepcopy(cd_unet)
    procs = dict(unet.attn_processors)
    plain = {name: AttnProcessor2_0() for name in procs}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, unet=unet, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(d / folder / "<new1>.safetensors"), token="<new1>")
    pipe.unet.set_attn_processor(dict(procs if active(0, start, end) else plain))

    def on_step_end(p, i, t, kwargs):
        p.unet.set_attn_processor(dict(procs if active(i + 1, start, end) else plain))
        return kwargs

    return pipe(CD_PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="np", callback_on_step_end=on_step_end).images


def _requests(steps=STEPS):
    return [
        impasto.Request(PROMPT, adapters=[impasto.Adapter("lo", 0.8, start=0.4)], steps=steps, seed=3, output_type="np"),
        impasto.Request(CD_PROMPT, adapters=[impasto.Adapter("cd", end=0.6)], steps=steps, seed=4, output_type="np"),
        impasto.Request(PROMPT, adapters=[("lo", 0.8)], steps=steps, seed=3, output_type="np"),  # always on
    ]


def test_scheduled_lora_and_kv_equal_the_diffusers_callback(tiny_dir, world, eng):
    d, cd_unet = world
    lo, kv, full = eng.generate_batch(_requests())  # one batch: scheduled and plain rows together
    assert lo.error is None and kv.error is None and full.error is None
    ref_lo = lora_reference(tiny_dir, d, 0.8, 0.4, 1.0, seed=3)
    ref_kv = kv_reference(tiny_dir, d, cd_unet, 0.0, 0.6, seed=4)
    assert _diff(lo.images, ref_lo) <= TOL
    assert _diff(kv.images, ref_kv) <= TOL
    # the schedule mattered: on for every step and off for every step both differ from it
    none = eng.generate(PROMPT, steps=STEPS, seed=3, output_type="np").images
    assert _diff(lo.images, full.images) > 10 * TOL and _diff(lo.images, none) > 10 * TOL
    always = eng.generate(CD_PROMPT, adapters=["cd"], steps=STEPS, seed=4, output_type="np").images
    assert _diff(kv.images, always) > 10 * TOL
    # alone equals in a batch
    alone = eng.generate(PROMPT, adapters=[impasto.Adapter("lo", 0.8, start=0.4)], steps=STEPS, seed=3,
                         output_type="np").images
    assert _diff(alone, lo.images) <= 1e-5


def test_scheduled_crossattn_folder_equals_the_diffusers_callback(tiny_dir, world):
    """A --freeze_model crossattn folder with end=: its K/V on the planned path and its Q/out
    deltas in the row tables are switched off together, as diffusers' processors swapped out."""
    d, _ = world
    q_unet = custom_diffusion(tiny_dir, str(d / "cdq"), seed=2, scale=0.2, q_out=True)
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    try:
        e.adapters.register("cdq", str(d / "cdq"))
        out = e.generate(CD_PROMPT, adapters=[impasto.Adapter("cdq", end=0.6)], steps=STEPS, seed=4,
                         output_type="np").images
        always = e.generate(CD_PROMPT, adapters=["cdq"], steps=STEPS, seed=4, output_type="np").images
    finally:
        e.close()
    assert _diff(out, kv_reference(tiny_dir, d, q_unet, 0.0, 0.6, seed=4, folder="cdq")) <= TOL
    assert _diff(out, always) > 10 * TOL


def _styled_request(steps):
    return impasto.Request(STYLE_PROMPT, guidance=impasto.Guidance(cfg=5.0, styles={"wv": impasto.Adapter("wv", 3.0, start=0.5)}),
                           steps=steps, seed=13, output_type="np")


def test_compile_mode_schedules_without_a_recompile(tiny_dir, world, eng, style_pipe):
    compiles = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs Dynamo hands over
        compiles.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    torch._dynamo.reset()
    compiled = _engine(tiny_dir, world[0], compile=backend, max_rank=4, slots_per_bucket=2)
    compiled.adapters.register("wv", str(world[0] / "wv" / "pytorch_lora_weights.safetensors"), family="style",
                               suffix="in wavy style")
    try:
        # 2 steps: each scheduled adapter turns on or off once (lo: step 1 only; cd: step 0 only)
        first = compiled.generate(PROMPT, adapters=[("lo", 0.8)], steps=2, seed=3, output_type="np").images
        # a style request has 3 rows: its graph is compiled here, unscheduled
        compiled.generate(STYLE_PROMPT, guidance=impasto.Guidance(cfg=5.0, styles={"wv": 3.0}), steps=2, seed=13)
        n_graphs = len(compiles)
        assert n_graphs > 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            lo, kv, _, st = compiled.generate_batch(_requests(2) + [_styled_request(2)])
        assert lo.error is None and kv.error is None and st.error is None, (lo.error, kv.error, st.error)
        assert len(compiles) == n_graphs, "a scheduled adapter compiled a new graph"
    finally:
        compiled.close()
    eager_lo, eager_kv, _, eager_st = eng.generate_batch(_requests(2) + [_styled_request(2)])
    assert _diff(lo.images, eager_lo.images) <= 1e-4 and _diff(kv.images, eager_kv.images) <= 1e-4
    assert _diff(st.images, eager_st.images) <= 1e-4
    assert _diff(first, eager_lo.images) > 10 * TOL


def test_schedules_are_refused_where_computed_once(tiny_dir, world, eng, tmp_path):
    from test_text_encoder_lora import TE_TARGETS

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    torch.manual_seed(0)
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=TE_TARGETS, init_lora_weights=False),
                                  adapter_name="t")
    StableDiffusionPipeline.save_lora_weights(str(tmp_path / "te"), text_encoder_lora_layers=get_peft_model_state_dict(
        pipe.text_encoder, adapter_name="t"))
    eng.adapters.register("te", str(tmp_path / "te" / "pytorch_lora_weights.safetensors"))
    eng.adapters.register("r1", _concept(eng, 1, "<teddy>", "star", tmp_path))
    try:
        with pytest.raises(RequestError, match="text-encoder"):
            eng.generate(PROMPT, adapters=[impasto.Adapter("te", start=0.5)], steps=2, seed=1)
        with pytest.raises(RequestError, match="rank1.*start/end"):
            eng.generate("a <teddy>", adapters=[impasto.Adapter("r1", start=0.5)], steps=2, seed=1)
        # unscheduled, both still serve
        assert eng.generate(PROMPT, adapters=["te"], steps=2, seed=1).error is None
    finally:
        eng.adapters.unregister("te")
        eng.adapters.unregister("r1")
    for bad in (dict(start=0.5, end=0.5), dict(start=-0.1), dict(end=1.5), dict(start=float("nan"))):
        with pytest.raises(RequestError, match="start and end"):
            eng.generate(PROMPT, adapters=[impasto.Adapter("lo", **bad)], steps=2, seed=1)
    # a full window is the plain adapter
    a = eng.generate(PROMPT, adapters=[impasto.Adapter("lo", 0.8, start=0.0, end=1.0)], steps=2, seed=1,
                     output_type="np").images
    b = eng.generate(PROMPT, adapters=[("lo", 0.8)], steps=2, seed=1, output_type="np").images
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------- step-scheduled styles
STYLE_PROMPT = "a green heart on a gray background"


@pytest.fixture(scope="module")
def style_pipe(tiny_dir, world, eng):
    """A style LoRA (q/k/v/out of every attention, scale 1, as Pair Customization writes it)
    registered as a style, and the diffusers+PEFT UNet holding it beside "lo"."""
    d = world[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(d / "lo"), adapter_name="lo")
    torch.manual_seed(7)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=ATTN, init_lora_weights=False), adapter_name="wv")
    with torch.no_grad():  # strong enough that a step with or without it differs
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n and ".wv." in n:
                p.mul_(3.0)
    StableDiffusionPipeline.save_lora_weights(str(d / "wv"), unet_lora_layers=get_peft_model_state_dict(
        pipe.unet, adapter_name="wv"))
    eng.adapters.register("wv", str(d / "wv" / "pytorch_lora_weights.safetensors"), family="style",
                          suffix="in wavy style")
    yield pipe
    eng.adapters.unregister("wv")


def style_reference(pipe, *, seed, cfg, weight, window, lo=None):
    """The official style-guidance loop (uncond+cond in one call with the base adapters, then one
    call with base + the style LoRA on the suffixed prompt, e += w·(e_s − e_c)), the adapters'
    scales set before the first step and changed at each step's end for the next one, as
    diffusers' callback_on_step_end does. window: the style's (start, end); lo: (scale, start, end)."""
    from diffusers import DDIMScheduler
    from diffusers.utils.torch_utils import randn_tensor

    unet, sched = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    enc = lambda text: pipe.encode_prompt(text, "cpu", 1, False)[0]  # noqa: E731
    e_uc, e_s = torch.cat([enc(""), enc(STYLE_PROMPT)]), enc(STYLE_PROMPT + " in wavy style")
    scales = {}

    def on_step_end(i):  # the scales of step i (i = 0: before the first step)
        scales["lo"] = (lo[0] if active(i, *lo[1:]) else 0.0) if lo else 0.0
        scales["wv"] = 1.0 if active(i, *window) else 0.0

    def use(names):
        unet.set_adapters(names, [scales[n] for n in names])

    lat = randn_tensor((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    on_step_end(0)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(lat, t)
            use(["lo"])
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=e_uc).sample.chunk(2)
            use(["lo", "wv"])
            e = e_u + cfg * (e_c - e_u) + weight * (unet(x, t, encoder_hidden_states=e_s).sample - e_c)
            lat = sched.step(e, t, lat).prev_sample
            on_step_end(i + 1)
        image = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


def test_scheduled_styles_equal_the_official_loop_with_a_step_end_callback(style_pipe, eng):
    pipe = style_pipe
    A = impasto.Adapter
    reqs = [
        impasto.Request(STYLE_PROMPT, guidance=impasto.Guidance(cfg=5.0, styles={"wv": A("wv", 3.0, start=0.4)}),
                        steps=STEPS, seed=11, output_type="np"),
        impasto.Request(STYLE_PROMPT, guidance=impasto.Guidance(cfg=5.0, styles={"wv": A("wv", 3.0, end=0.6)}),
                        adapters=[A("lo", 0.8, start=0.2, end=0.8)], steps=STEPS, seed=12, output_type="np"),
        impasto.Request(STYLE_PROMPT, guidance=impasto.Guidance(cfg=5.0, styles={"wv": 3.0}), steps=STEPS, seed=11,
                        output_type="np"),  # always on, in the same batch
    ]
    late, early, full = eng.generate_batch(reqs)
    assert late.error is None and early.error is None and full.error is None, (late.error, early.error, full.error)
    ref_late = style_reference(pipe, seed=11, cfg=5.0, weight=3.0, window=(0.4, 1.0))
    ref_early = style_reference(pipe, seed=12, cfg=5.0, weight=3.0, window=(0.0, 0.6), lo=(0.8, 0.2, 0.8))
    ref_full = style_reference(pipe, seed=11, cfg=5.0, weight=3.0, window=(0.0, 1.0))
    assert _diff(late.images, ref_late) <= TOL
    assert _diff(early.images, ref_early) <= TOL
    assert _diff(full.images, ref_full) <= TOL
    # the schedule mattered: the style on at every step, and its LoRA off at every step, both differ
    never = style_reference(pipe, seed=11, cfg=5.0, weight=3.0, window=(0.0, 0.0))
    assert _diff(late.images, full.images) > 10 * TOL and _diff(late.images, never) > 10 * TOL
    alone = eng.generate(STYLE_PROMPT, guidance=reqs[0].guidance, steps=STEPS, seed=11, output_type="np").images
    assert _diff(alone, late.images) <= 1e-5


def test_style_schedules_bad_input(style_pipe, eng):
    A = impasto.Adapter
    for styles, match in (({"wv": A("other", 3.0, start=0.5)}, "named 'other'"),
                          ({"wv": A("wv", 3.0, start=0.7, end=0.3)}, "start and end"),
                          ({"wv": A("wv", 3.0, end=float("inf"))}, "start and end"),
                          ({"wv": A("wv", float("nan"), start=0.5)}, "weight must be a finite"),
                          ({"wv": A("wv", 3.0, start=0.5, beta=1)}, "options")):
        with pytest.raises(RequestError, match=match):
            eng.generate(STYLE_PROMPT, guidance=impasto.Guidance(styles=styles), steps=2, seed=1)
    # a full window is the plain weight
    a = eng.generate(STYLE_PROMPT, guidance=impasto.Guidance(styles={"wv": A("wv", 2.0)}), steps=2, seed=1,
                     output_type="np").images
    b = eng.generate(STYLE_PROMPT, guidance=impasto.Guidance(styles={"wv": 2.0}), steps=2, seed=1,
                     output_type="np").images
    assert np.array_equal(a, b)
