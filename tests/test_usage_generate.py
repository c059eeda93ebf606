"""Per-request samplers, seeds per image, img2img, clip skip, long and weighted prompts and
callbacks: each equal to its diffusers pipeline (or an independent implementation of A1111's
math) on the random-weight fixture, alone and mixed in one batch of the step-level worker."""

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionImg2ImgPipeline

import impasto
from impasto import schedulers

TOL = 1e-3
NEQ = 10 * TOL  # "differs": what changing the sampler, prompt or image does on the random fixture
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _use(pipe, name):
    cls, overrides = schedulers.resolve(name)
    config = pipe.__dict__.setdefault("_ddim_config", pipe.scheduler.config)  # never a previous test's overrides
    pipe.scheduler = getattr(__import__("diffusers"), cls).from_config(config, **overrides)
    return pipe


def _ref(pipe, prompt, *, seed=None, steps=4, guidance=7.5, generator=None, scheduler="DDIM", **kw):
    _use(pipe, scheduler)  # the fixture's own scheduler is DDIM
    g = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np", **kw).images


def _init_image(seed=0, size=32):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """diffusers' pipeline on the fixture, once for the module (tests set its scheduler)."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    p.__dict__["_ddim_config"] = p.scheduler.config
    return p


def _count(engine):
    rows = []
    handle = engine.base.unet.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    return rows, handle


# ------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name", ["DPM++ 2M Karras", "Heun", "DPM++ 2M SDE"])  # Euler a, LCM: below
def test_sampler_per_request_equals_diffusers(engine, pipe, name):
    out = engine.generate("a red star", steps=4, seed=3, scheduler=name, output_type="np")
    ref = _ref(pipe, "a red star", seed=3, scheduler=name)
    assert _diff(out.images, ref) <= TOL
    default = engine.generate("a red star", steps=4, seed=3, output_type="np")  # the model's DDIM
    assert _diff(out.images, default.images) > NEQ


def test_samplers_mixed_in_one_batch_share_forwards(engine):
    names = ["DDIM", "Euler a", "LCM"]
    reqs = [impasto.Request("a blue square", seed=5, steps=4, scheduler=n, output_type="np") for n in names]
    rows, handle = _count(engine)
    try:
        outs = engine.generate_batch(reqs)
    finally:
        handle.remove()
    assert all(o.error is None for o in outs)
    assert rows == [2 * len(names)] * 4  # every step: ONE forward of every request's two branches
    for req, out in zip(reqs, outs):
        assert _diff(out.images, engine.generate_batch([req])[0].images) <= TOL


def test_sampler_names_table():
    assert schedulers.resolve("dpm++ 2m karras") == ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    assert schedulers.resolve("EulerDiscreteScheduler") == ("EulerDiscreteScheduler", {})
    with pytest.raises(impasto.RequestError, match="unknown sampler 'DPM fast'.*Euler a"):
        schedulers.resolve("DPM fast")
    sched = schedulers.build("DPM++ 2M SDE Karras", _ddim_config())
    assert schedulers.a1111_name(sched) == "DPM++ 2M SDE Karras"
    assert schedulers.a1111_name(schedulers.build("DPM++ 2M", _ddim_config())) == "DPM++ 2M"


def _ddim_config():
    from diffusers import DDIMScheduler

    from impasto.tiny import SCHEDULER_CONFIG

    return DDIMScheduler(**SCHEDULER_CONFIG).config


def test_unknown_sampler_is_refused_at_submit(engine):
    with pytest.raises(impasto.RequestError, match="scheduler: unknown sampler 'Euler b'"):
        engine.submit(impasto.Request("x", scheduler="Euler b"))


# ------------------------------------------------------------------ seeds
def test_seeds_per_image_equal_a_generator_list(engine, pipe):
    out = engine.generate("two stars", steps=4, seeds=[3, 5], num_images=2, scheduler="Euler a", output_type="np")
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 5)]
    ref = _ref(pipe, "two stars", generator=gens, num_images_per_prompt=2, scheduler="Euler a")
    assert _diff(out.images, ref) <= TOL
    assert out.seeds == [3, 5] and out.seed == 3
    alone = engine.generate("two stars", steps=4, seeds=[5], scheduler="Euler a", output_type="np")
    assert _diff(out.images[1:], alone.images) <= TOL  # image i is what its seed makes alone
    assert engine.generate("x", steps=1, seed=9, num_images=2, output_type="latent").seeds == [9, 9]
    with pytest.raises(impasto.RequestError, match="seeds: 1 seeds for num_images=2"):
        engine.submit(impasto.Request("x", seeds=[1], num_images=2))


# ------------------------------------------------------------------ img2img
@pytest.fixture(scope="module")
def img2img(pipe):
    p = StableDiffusionImg2ImgPipeline(**pipe.components)
    p.__dict__["_ddim_config"] = pipe._ddim_config
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("name", ["DDIM", "Euler a"])
def test_img2img_equals_diffusers(engine, img2img, name):
    image = _init_image()
    out = engine.generate("a green circle", image=image, strength=0.6, steps=8, seed=4, scheduler=name,
                          output_type="np")
    ref = _ref(img2img, "a green circle", image=image, strength=0.6, steps=8, seed=4, scheduler=name)
    assert out.images.shape == ref.shape == (1, 32, 32, 3)
    assert _diff(out.images, ref) <= TOL
    other = _ref(img2img, "a green circle", image=_init_image(1), strength=0.6, steps=8, seed=4, scheduler=name)
    assert _diff(out.images, other) > NEQ  # the image matters


def test_img2img_seeds_list_and_alias(engine, img2img):
    image = _init_image(2)
    out = engine.generate("a star", init_image=image, strength=0.5, steps=6, seeds=[1, 2], num_images=2,
                          output_type="np")
    gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
    ref = _ref(img2img, "a star", image=image, strength=0.5, steps=6, generator=gens,
               num_images_per_prompt=2)
    assert _diff(out.images, ref) <= TOL


def test_img2img_shares_forwards_with_text_requests(engine):
    reqs = [impasto.Request("a red star", seed=1, steps=6, output_type="np"),
            impasto.Request("a blue disc", image=_init_image(3), strength=0.5, seed=2, steps=6, output_type="np",
                            scheduler="Euler")]
    rows, handle = _count(engine)
    try:
        outs = engine.generate_batch(reqs)
    finally:
        handle.remove()
    assert rows == [4] * 3 + [2] * 3  # 6 x 0.5 = 3 steps for the img2img request, at the schedule's end
    for req, out in zip(reqs, outs):
        assert _diff(out.images, engine.generate_batch([req])[0].images) <= TOL


@pytest.mark.parametrize("kwargs,match", [
    (dict(image="not an image"), "image: expected a PIL image"),
    (dict(image=np.zeros((8, 8))), r"image: expected an HxWx3 array"),
    (dict(image=np.full((32, 32, 3), np.nan)), r"image: array values must be finite"),
    (dict(image=_init_image(size=30)), "height: 30 is not a multiple"),
    (dict(image=_init_image(), strength=0.0), r"strength: expected a number in \(0, 1\]"),
    (dict(image=_init_image(), strength=0.1, steps=4), "leaves no denoising step"),
    (dict(image=_init_image(), init_image=_init_image()), "give one"),
])
def test_bad_init_images(engine, kwargs, match):
    with pytest.raises(impasto.RequestError, match=match):
        engine.submit(impasto.Request("x", **kwargs))


# ------------------------------------------------------------------ clip skip
def _skipped(pipe, text, skip):
    """diffusers' clip_skip=skip-1 encoding (hidden_states[-skip] through the final layer norm),
    written out: diffusers 0.42's own reads `text_encoder.text_model`, gone in transformers 5."""
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-skip]
        return pipe.text_encoder.final_layer_norm(h)


def test_clip_skip_equals_diffusers(engine, pipe):
    out = engine.generate("a yellow circle", steps=4, seed=2, clip_skip=2, output_type="np")
    ref = _ref(pipe, None, seed=2, prompt_embeds=_skipped(pipe, "a yellow circle", 2),
               negative_prompt_embeds=_skipped(pipe, "", 2))  # A1111 skips in both branches
    assert _diff(out.images, ref) <= TOL
    assert _diff(out.images, _ref(pipe, "a yellow circle", seed=2)) > NEQ
    with pytest.raises(impasto.RequestError, match="clip_skip: 3 is more than the text encoder's 2 layers"):
        engine.submit(impasto.Request("x", clip_skip=3))


# ------------------------------------------------------------------ long and weighted prompts
def _chunk_ref(pipe, texts_weights, n_chunks):
    """An independent A1111 encoding: 75-token chunks [BOS, t, EOS, PAD..], each encoded alone,
    each token's encoding times its weight, the chunk's mean restored; padded with empty chunks."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids, ws = [], []
    for text, w in texts_weights:
        t = tok(text, add_special_tokens=False).input_ids
        ids += t
        ws += [w] * len(t)
    out = []
    for c in range(n_chunks):
        part, pw = ids[75 * c: 75 * (c + 1)], ws[75 * c: 75 * (c + 1)]
        row = [tok.bos_token_id] + part + [tok.eos_token_id]
        pw = [1.0] + pw + [1.0] + [1.0] * (77 - len(row))
        row += [tok.pad_token_id] * (77 - len(row))
        with torch.no_grad():
            z = te(torch.tensor([row]))[0][0]
        w = torch.tensor(pw)[:, None]
        if (w != 1).any():
            z2 = z * w
            z = z2 * (z.mean() / z2.mean())
        out.append(z)
    return torch.cat(out)[None]


def test_long_prompt_is_chunked_as_a1111(engine, pipe):
    words = "red blue green star circle square small large"
    prompt = " ".join([words] * 12)  # 96 tokens: two chunks, no commas
    n = len(pipe.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 75 < n <= 150
    out = engine.generate(prompt, negative_prompt="blurry", steps=4, seed=1, output_type="np")
    assert not out.warnings
    cond = _chunk_ref(pipe, [(prompt, 1.0)], 2)
    uncond = _chunk_ref(pipe, [("blurry", 1.0)], 1)
    empty = _chunk_ref(pipe, [("", 1.0)], 1)
    ref = _ref(pipe, None, seed=1, prompt_embeds=cond, negative_prompt_embeds=torch.cat([uncond, empty], 1))
    assert _diff(out.images, ref) <= TOL
    truncated = _ref(pipe, prompt, seed=1, negative_prompt="blurry")  # diffusers cuts at 77
    assert _diff(out.images, truncated) > NEQ


def test_weighted_prompt_equals_the_a1111_math(engine, pipe):
    out = engine.generate("a (red:1.3) star on [blue]", steps=4, seed=6, prompt_syntax="a1111", output_type="np")
    cond = _chunk_ref(pipe, [("a ", 1.0), ("red", 1.3), (" star on ", 1.0), ("blue", 1 / 1.1)], 1)
    uncond = _chunk_ref(pipe, [("", 1.0)], 1)
    ref = _ref(pipe, None, seed=6, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert _diff(out.images, ref) <= TOL
    plain = engine.generate("a (red:1.3) star on [blue]", steps=4, seed=6, output_type="np")  # parens are text
    assert _diff(plain.images, _ref(pipe, "a (red:1.3) star on [blue]", seed=6)) <= TOL
    assert _diff(out.images, plain.images) > NEQ


def test_weighted_and_plain_requests_share_a_batch(engine):
    reqs = [impasto.Request("a (red:1.4) star", seed=1, steps=3, prompt_syntax="a1111", output_type="np"),
            impasto.Request(" ".join(["blue square"] * 50), seed=2, steps=3, clip_skip=2, output_type="np"),
            impasto.Request("a green disc", seed=3, steps=3, scheduler="Euler a", output_type="np")]
    rows, handle = _count(engine)
    try:
        outs = engine.generate_batch(reqs)
    finally:
        handle.remove()
    assert rows == [6] * 3
    for req, out in zip(reqs, outs):
        assert _diff(out.images, engine.generate_batch([req])[0].images) <= TOL


def test_prompt_past_the_chunk_cap_is_truncated_with_a_warning(tiny_dir):
    with impasto.Engine.from_pretrained(tiny_dir, device="cpu", max_prompt_chunks=1, prompt_syntax="a1111") as e:
        out = e.generate(" ".join(["red star"] * 60), steps=1, seed=1, output_type="latent")
        with pytest.raises(impasto.AdapterNameError) as tag:  # the engine's default syntax reads <lora:...> tags
            e.generate("a dog <lora:nobody:1>", steps=1)
        assert "nobody" in str(tag.value) and "placeholder" not in str(tag.value)
        with pytest.raises(impasto.AdapterNameError, match="placeholder '<lora:nobody:1>'"):  # plain: a placeholder
            e.generate("a dog <lora:nobody:1>", steps=1, prompt_syntax="plain")
    assert any("truncated to the first 75" in w for w in out.warnings)


# ------------------------------------------------------------------ <lora:NAME:W>
def test_a1111_syntax_reads_lora_tags(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "corgi.safetensors"
    safetensors.torch.save_file({f"unet.{Q}.lora_A.weight": torch.randn(4, 32, generator=g),
                                 f"unet.{Q}.lora_B.weight": torch.randn(32, 4, generator=g)}, str(path))
    engine.adapters.register("tagged-corgi", str(path))
    try:
        tagged = engine.generate("a dog <lora:tagged-corgi:0.7> on grass", steps=3, seed=1, prompt_syntax="a1111",
                                 output_type="np")
        named = engine.generate("a dog on grass", adapters=[("tagged-corgi", 0.7)], steps=3, seed=1, output_type="np")
        plain = engine.generate("a dog on grass", steps=3, seed=1, output_type="np")
        with pytest.raises(impasto.AdapterNameError):
            engine.generate("a dog <lora:nobody:1>", steps=1, prompt_syntax="a1111")
    finally:
        engine.adapters.unregister("tagged-corgi")
    assert _diff(tagged.images, named.images) == 0.0
    assert _diff(tagged.images, plain.images) > NEQ


# ------------------------------------------------------------------ callbacks
def test_callback_every_step_with_preview(engine):
    seen = []
    out = engine.generate("a star", steps=3, seed=1, preview=True, output_type="np",
                          callback=lambda i, n, p: seen.append((i, n, None if p is None else p.shape)))
    assert seen == [(1, 3, (1, 16, 16, 3)), (2, 3, (1, 16, 16, 3)), (3, 3, (1, 16, 16, 3))]
    seen.clear()
    engine.generate("a star", steps=2, seed=1, callback=lambda i, n, p: seen.append(p))
    assert seen == [None, None]  # no preview unless asked


def test_preview_approximates_the_decode():
    """On the trained miniature model (a random VAE has no colours to approximate)."""
    from impasto import tiny
    from impasto.images import latent_preview

    if not tiny.tiny_model_dir()[1]:
        pytest.skip("the trained miniature model is not in this checkout")
    with impasto.Engine.from_pretrained("tiny", device="cpu") as engine:
        lat = engine.generate("a red circle on a blue background", steps=20, seed=2, output_type="latent").images
        img = engine.generate("a red circle on a blue background", steps=20, seed=2, output_type="np").images
        prev = latent_preview(lat, engine.base.vae.config.scaling_factor, engine.preview_map())
    target = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(img).permute(0, 3, 1, 2), lat.shape[-2:])
    target = target.permute(0, 2, 3, 1).numpy()
    err = float(((prev - target) ** 2).mean())
    assert err < 0.5 * float(((target - target.mean((0, 1, 2))) ** 2).mean())  # well ahead of the mean colour


def test_callback_error_fails_only_its_request_and_cancel_from_callback(engine):
    def boom(i, n, p):
        raise ValueError("ui went away")

    jobs = {}

    def cancel_at_two(i, n, p):
        if i == 2:
            jobs["c"].cancel()

    reqs = [impasto.Request("a", steps=3, seed=1, callback=boom), impasto.Request("b", steps=3, seed=2),
            impasto.Request("c", steps=6, seed=3, callback=cancel_at_two)]
    jobs["c"] = None
    subs = engine._submit(reqs, raise_errors=False)
    jobs["c"] = subs[2]
    outs = [j.output(60) for j in subs]
    assert isinstance(outs[0].error, impasto.RequestFailedError) and "callback failed: ValueError" in str(outs[0].error)
    assert outs[1].error is None
    assert isinstance(outs[2].error, impasto.RequestCancelledError)
    with pytest.raises(impasto.RequestError, match="callback: expected a callable"):
        engine.submit(impasto.Request("x", callback=3))
