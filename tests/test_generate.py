"""Base generation equals diffusers' StableDiffusionPipeline; batching changes nothing."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import impasto

TOL = 1e-3


def _ref(pipe, prompt, *, seed, steps=8, guidance=7.5, negative_prompt=None, num_images=1, **kw):
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        negative_prompt=negative_prompt,
        num_images_per_prompt=num_images,
        generator=g,
        output_type="np",
        **kw,
    ).images


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_equals_diffusers_pipeline(tiny_dir, pipe, scheduler):
    eng = impasto.Engine.from_pretrained(tiny_dir, scheduler=scheduler)
    pipe.scheduler = getattr(__import__("diffusers"), scheduler).from_config(pipe.scheduler.config)
    out = eng.generate("a red star on a blue background", negative_prompt="green", steps=8, seed=7, output_type="np")
    ref = _ref(pipe, "a red star on a blue background", negative_prompt="green", seed=7)
    assert out.images.shape == ref.shape == (1, 32, 32, 3)
    assert _max_diff(out.images, ref) <= TOL
    # the comparison can fail: another seed gives another image
    other = _ref(pipe, "a red star on a blue background", negative_prompt="green", seed=8)
    assert _max_diff(out.images, other) > 100 * TOL


def test_num_images_and_no_cfg_equal_diffusers(engine, pipe):
    out = engine.generate("two small stars", steps=6, seed=11, num_images=2, output_type="np")
    assert _max_diff(out.images, _ref(pipe, "two small stars", seed=11, steps=6, num_images=2)) <= TOL
    out = engine.generate("two small stars", steps=6, seed=11, guidance=1.0, output_type="np")
    assert _max_diff(out.images, _ref(pipe, "two small stars", seed=11, steps=6, guidance=1.0)) <= TOL


def test_guidance_rescale_equals_diffusers(engine, pipe):
    g = impasto.Guidance(cfg=5.0, rescale=0.7)
    out = engine.generate("a yellow circle", steps=6, seed=2, guidance=g, output_type="np")
    ref = _ref(pipe, "a yellow circle", seed=2, steps=6, guidance=5.0, guidance_rescale=0.7)
    assert _max_diff(out.images, ref) <= TOL


def generate_counting_rows(engine, requests):
    """engine.generate_batch(requests), and the batch size (rows) of every UNet forward it ran."""
    rows = []
    handle = engine.base.unet.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        return engine.generate_batch(requests), rows
    finally:
        handle.remove()


def test_batch_is_one_forward_per_step_and_equals_solo(engine):
    reqs = [
        impasto.Request("a red star", seed=1, steps=5, guidance=7.5, output_type="np"),
        impasto.Request("a blue square", seed=2, steps=5, guidance=3.0, negative_prompt="red", output_type="np"),
        impasto.Request("a green circle", seed=3, steps=5, guidance=1.0, output_type="np", num_images=2),
    ]
    outs, calls = generate_counting_rows(engine, reqs)
    assert all(o.error is None for o in outs)
    assert calls == [2 + 2 + 2] * 5  # 5 steps, each ONE forward of all branch rows
    for req, out in zip(reqs, outs):
        solo = engine.generate_batch([req])[0]
        assert _max_diff(out.images, solo.images) <= TOL
    assert _max_diff(outs[0].images, outs[1].images) > 100 * TOL


def test_steps_share_forwards_sizes_are_grouped(engine):
    """Requests of 4 and 3 steps share forwards (per-row timesteps); only the latent size
    separates forwards."""
    reqs = [
        impasto.Request("a red star", seed=1, steps=4, output_type="np"),
        impasto.Request("a red star", seed=1, steps=3, output_type="np"),
        impasto.Request("a red star", seed=1, steps=4, height=48, width=32, output_type="np"),
        impasto.Request("a blue star", seed=5, steps=4, output_type="np"),
    ]
    outs, calls = generate_counting_rows(engine, reqs)
    assert [o.images.shape for o in outs] == [(1, 32, 32, 3), (1, 32, 32, 3), (1, 48, 32, 3), (1, 32, 32, 3)]
    # 32x32: three requests (2 rows each) for 3 steps, then the two of 4 steps; 48x32: 4 forwards
    # of 2 rows; the two sizes take turns
    assert calls == [6, 2, 6, 2, 6, 2, 4, 2]
    for req, out in zip(reqs, outs):
        assert _max_diff(out.images, engine.generate_batch([req])[0].images) <= TOL


def test_output_types_and_seed(engine, pipe):
    pil = engine.generate("a star", steps=3, seed=4)
    assert len(pil.images) == 1 and pil.images[0].size == (32, 32)
    lat = engine.generate("a star", steps=3, seed=4, output_type="latent")
    assert lat.images.shape == (1, 4, 16, 16)
    ref = pipe("a star", num_inference_steps=3, generator=torch.Generator().manual_seed(4), output_type="latent").images
    assert float((lat.images - ref).abs().max()) <= TOL
    assert set(pil.timings) == {"queued", "plan", "denoise", "decode", "total"}
    drawn = engine.generate("a star", steps=2, output_type="latent")
    again = engine.generate("a star", steps=2, seed=drawn.seed, output_type="latent")
    assert torch.equal(drawn.images, again.images)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=0), "steps"),
        (dict(num_images=0), "num_images"),
        (dict(output_type="png"), "output_type"),
        (dict(height=30), "height"),
        (dict(guidance="high"), "guidance"),
        (dict(seed=-1), "seed"),
        (dict(adapters=[("a", "x")]), "adapters"),
        (dict(adapters=["a", "b", "c", "d", "e"]), "adapters"),
    ],
)
def test_bad_request_fields(engine, kwargs, field):
    with pytest.raises(impasto.RequestError, match=field):
        engine.generate("a star", **kwargs)


def test_failed_request_does_not_disturb_the_batch(engine):
    good = impasto.Request("a red star", seed=1, steps=3, output_type="np")
    outs = engine.generate_batch([impasto.Request("x", adapters=["nope"]), good, impasto.Request("y", steps=-2)])
    assert isinstance(outs[0].error, impasto.AdapterNameError) and "nope" in str(outs[0].error)
    assert outs[0].images is None
    assert isinstance(outs[2].error, impasto.RequestError)
    assert outs[1].error is None
    assert _max_diff(outs[1].images, engine.generate_batch([good])[0].images) == 0.0
    with pytest.raises(impasto.AdapterNameError):
        engine.generate("x", adapters=["nope"])


def test_scheduler_argument_forms(tiny_dir):
    inst = DPMSolverMultistepScheduler.from_config(DDIMScheduler().config)
    assert impasto.Engine.from_pretrained(tiny_dir, scheduler=inst).base.scheduler is inst
    eng = impasto.Engine.from_pretrained(tiny_dir, scheduler="DPMSolverMultistepScheduler")
    assert type(eng.base.scheduler).__name__ == "DPMSolverMultistepScheduler"
    with pytest.raises(impasto.ModelLoadError, match="NoSuchScheduler"):
        impasto.Engine.from_pretrained(tiny_dir, scheduler="NoSuchScheduler")
