"""Inpainting: `mask_image=` on a regular base (diffusers' latent-blending path) and on an
inpainting base (UNet in_channels = 2C + 1), each equal to StableDiffusionInpaintPipeline on
random-weight fixtures, alone and with other requests in one shared UNet forward."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image

import impasto
from impasto import schedulers

TOL = 1e-3
NEQ = 10 * TOL


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _image(seed=0, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size=32):
    """White (repaint) on the right half and a square at the top left, black elsewhere."""
    m = np.zeros((size, size), dtype=np.uint8)
    m[:, size // 2:] = 255
    m[2:10, 2:10] = 255
    return Image.fromarray(m, mode="L")


def _pipeline(components_or_dir):
    if isinstance(components_or_dir, str):
        p = StableDiffusionInpaintPipeline.from_pretrained(components_or_dir, local_files_only=True,
                                                           safety_checker=None, requires_safety_checker=False)
    else:
        p = StableDiffusionInpaintPipeline(**components_or_dir)
    p.set_progress_bar_config(disable=True)
    p.__dict__["_config"] = p.scheduler.config
    return p


def _ref(p, prompt, *, scheduler="DDIM", seed=None, generator=None, steps=4, **kw):
    cls, overrides = schedulers.resolve(scheduler)
    p.scheduler = getattr(__import__("diffusers"), cls).from_config(p._config, **overrides)
    g = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
    return p(prompt, num_inference_steps=steps, generator=g, output_type="np", **kw).images


def _rows(engine):
    rows = []
    return rows, engine.base.unet.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape[:2])))


@pytest.fixture(scope="module")
def blend_pipe(pipe):
    """The 4-channel fixture in diffusers' inpainting pipeline: its latent-blending path."""
    return _pipeline(pipe.components)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory):
    """A random SD-layout fixture whose UNet takes 2 x 4 + 1 = 9 channels (SD's inpainting layout)."""
    from impasto.tiny import build_random_model

    return build_random_model(str(tmp_path_factory.mktemp("inpaint") / "model"), seed=0,
                              unet_config={"in_channels": 9})


@pytest.fixture(scope="module")
def inpaint_engine(inpaint_dir):
    with impasto.Engine.from_pretrained(inpaint_dir, device="cpu") as e:
        yield e


@pytest.fixture(scope="module")
def inpaint_pipe(inpaint_dir):
    return _pipeline(inpaint_dir)


# ------------------------------------------------------------------ regular base: latent blending
@pytest.mark.parametrize("scheduler,strength,seeds", [("DDIM", None, None), ("Euler a", 0.7, [3, 5])])
def test_mask_on_a_regular_base_equals_diffusers_blending(engine, blend_pipe, scheduler, strength, seeds):
    image, mask = _image(), _mask()
    n = len(seeds) if seeds else 1
    kw = dict(strength=strength) if strength is not None else {}
    out = engine.generate("a red star", image=image, mask_image=mask, steps=4, seed=2, seeds=seeds, num_images=n,
                          scheduler=scheduler, output_type="np", **kw)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds] if seeds else None
    ref = _ref(blend_pipe, "a red star", image=image, mask_image=mask, scheduler=scheduler, seed=2, generator=gens,
               num_images_per_prompt=n, strength=strength or 1.0)
    assert out.images.shape == ref.shape == (n, 32, 32, 3)
    assert _diff(out.images, ref) <= TOL
    other = _ref(blend_pipe, "a red star", image=image, mask_image=Image.new("L", (32, 32), 255), scheduler=scheduler,
                 seed=2, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds] if seeds else None,
                 num_images_per_prompt=n, strength=strength or 1.0)
    assert _diff(out.images, other) > NEQ  # the mask matters


def test_masked_and_plain_requests_share_one_forward(engine):
    reqs = [impasto.Request("a blue disc", image=_image(1), mask_image=_mask(), seed=1, steps=4, output_type="np"),
            impasto.Request("a red star", seed=2, steps=4, output_type="np", scheduler="Euler a"),
            impasto.Request("a square", image=_image(2), mask_image=np.ones((32, 32)) * 0.9, strength=0.5, seed=3,
                            steps=4, output_type="np")]
    rows, handle = _rows(engine)
    try:
        outs = engine.generate_batch(reqs)
    finally:
        handle.remove()
    assert all(o.error is None for o in outs)
    assert rows == [(6, 4)] * 2 + [(4, 4)] * 2  # the strength-0.5 request runs the last 2 of 4 steps
    for req, out in zip(reqs, outs):
        assert _diff(out.images, engine.generate_batch([req])[0].images) <= TOL


# ------------------------------------------------------------------ inpainting base: 9 channels
@pytest.mark.parametrize("scheduler,strength,seeds", [("DDIM", None, None), ("Euler a", 0.6, [1, 2])])
def test_inpainting_unet_equals_diffusers(inpaint_engine, inpaint_pipe, scheduler, strength, seeds):
    assert inpaint_engine.base.inpainting and inpaint_engine.base.unet.config.in_channels == 9
    image, mask = _image(3), _mask()
    n = len(seeds) if seeds else 1
    kw = dict(strength=strength) if strength is not None else {}
    out = inpaint_engine.generate("a green circle", image=image, mask_image=mask, steps=5, seed=4, seeds=seeds,
                                  num_images=n, scheduler=scheduler, output_type="np", **kw)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds] if seeds else None
    ref = _ref(inpaint_pipe, "a green circle", image=image, mask_image=mask, scheduler=scheduler, seed=4,
               generator=gens, num_images_per_prompt=n, strength=strength or 1.0, steps=5)
    assert _diff(out.images, ref) <= TOL
    other = _ref(inpaint_pipe, "a green circle", image=_image(4), mask_image=mask, scheduler=scheduler, seed=4,
                 generator=[torch.Generator("cpu").manual_seed(s) for s in seeds] if seeds else None,
                 num_images_per_prompt=n, strength=strength or 1.0, steps=5)
    assert _diff(out.images, other) > NEQ  # the masked image reaches the UNet


def test_inpainting_base_serves_text_and_img2img_requests_in_the_same_forward(inpaint_engine, inpaint_pipe):
    """Without a mask, a request on an inpainting base repaints everything (A1111: mask all ones,
    masked image blank): diffusers' inpainting pipeline with an all-white mask."""
    white = Image.new("L", (32, 32), 255)
    reqs = [impasto.Request("a red star", seed=1, steps=4, output_type="np"),
            impasto.Request("a blue disc", image=_image(5), strength=0.5, seed=2, steps=4, output_type="np"),
            impasto.Request("a square", image=_image(6), mask_image=_mask(), seed=3, steps=4, output_type="np")]
    rows, handle = _rows(inpaint_engine)
    try:
        outs = inpaint_engine.generate_batch(reqs)
    finally:
        handle.remove()
    assert all(o.error is None for o in outs)
    assert rows == [(6, 9)] * 2 + [(4, 9)] * 2
    refs = [_ref(inpaint_pipe, "a red star", image=_image(9), mask_image=white, seed=1),  # strength 1: image unused
            _ref(inpaint_pipe, "a blue disc", image=_image(5), mask_image=white, strength=0.5, seed=2),
            _ref(inpaint_pipe, "a square", image=_image(6), mask_image=_mask(), seed=3)]
    for out, ref in zip(outs, refs):
        assert _diff(out.images, ref) <= TOL


# ------------------------------------------------------------------ mistakes
@pytest.mark.parametrize("kwargs,match", [
    (dict(mask_image=_mask()), "mask_image: inpainting needs the image to repaint"),
    (dict(image=_image(), mask_image="white"), "mask_image: expected a PIL image"),
    (dict(image=_image(), mask_image=np.zeros((2, 32, 32))), r"mask_image: expected an HxW array"),
    (dict(image=_image(), mask_image=np.full((32, 32), np.nan)), r"mask_image: values must be finite"),
    (dict(image=_image(), mask_image=torch.full((32, 32), 2.0)), r"mask_image: values must be finite and in \[0, 1\]"),
    (dict(image=_image(), mask_image=_mask(), strength=0.1, steps=4), "leaves no denoising step"),
])
def test_bad_masks_are_refused_at_submit(engine, kwargs, match):
    with pytest.raises(impasto.RequestError, match=match):
        engine.submit(impasto.Request("x", **kwargs))


def test_an_8_channel_vae_takes_a_17_channel_inpainting_unet(tmp_path):
    """The miniature model's layout (8 latent channels): its inpainting UNet takes 2 x 8 + 1 = 17
    channels. diffusers' pipeline hard-codes 9, so this checks the rows the UNet is given: the
    latents, then the mask on the latent grid, then the masked image's 8 latent channels."""
    from diffusers import AutoencoderKL

    from impasto.tiny import VAE_CONFIG, build_random_model

    path = build_random_model(str(tmp_path / "m"), seed=1, unet_config={"in_channels": 17, "out_channels": 8})
    torch.manual_seed(2)
    AutoencoderKL(**{**VAE_CONFIG, "latent_channels": 8}).save_pretrained(str(tmp_path / "m" / "vae"))
    mask = _mask()
    with impasto.Engine.from_pretrained(path, device="cpu") as e:
        assert e.base.inpainting
        seen = []
        handle = e.base.unet.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
        try:
            outs = e.generate_batch([impasto.Request("a star", image=_image(), mask_image=mask, seed=1, steps=2,
                                                     output_type="latent"),
                                     impasto.Request("a disc", seed=2, steps=2, output_type="latent")])
        finally:
            handle.remove()
        alone = e.generate("a star", image=_image(), mask_image=mask, seed=1, steps=2, output_type="latent").images
    assert all(x.shape == (4, 17, 16, 16) for x in seen)
    grid = torch.nn.functional.interpolate(e.mask_processor.preprocess(mask), size=(16, 16))
    for x in seen:
        assert torch.equal(x[:2, 8:9], grid.expand(2, 1, 16, 16))  # the masked request's two branches
        assert torch.equal(x[2:, 8:9], torch.ones(2, 1, 16, 16))  # no mask: repaint everything
        assert torch.equal(x[:2, 9:], x[:1, 9:].expand(2, 8, 16, 16))  # the same masked image in both branches
    assert float((outs[0].images - alone).abs().max()) <= TOL
