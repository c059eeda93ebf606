"""The customization protocol's data: eval.concept_set, concept_accuracy, context prompt fidelity."""

import numpy as np
import pytest
from PIL import Image

from impasto import eval as ev
from impasto.tiny import world


@pytest.mark.parametrize("obj", sorted(world.NOVEL_OBJECTS))
def test_concept_set(obj):
    cs = ev.concept_set(obj, seed=0)
    again = ev.concept_set(obj, seed=0)
    assert len(cs.images) == len(cs.masks) == 8 and len(cs.templates) == len(cs.seeds) == 48
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(cs.images, again.images))
    assert cs.class_word == world.NOVEL_OBJECTS[obj].supercategory
    for im, m in zip(cs.images, cs.masks):
        a = np.asarray(im).astype(float)
        assert m.shape == (32, 32) and 0 < m.mean() < 0.5 and m.min() >= 0 and m.max() <= 1
        # the mask is exact: where it is 0 the image is the background alone, where 1 the object
        obj_px, bg_px = a[m == 1], a[m == 0]
        assert len(obj_px) and len(bg_px)
        assert np.abs(obj_px.mean(0) - bg_px.mean(0)).max() > 20
    prompts = cs.prompts("<new1> " + cs.class_word)
    named = [world.parse_prompt(p) for p in prompts]
    assert all(n["background"] not in cs.reference_backgrounds for n in named)
    assert {n["count"] for n in named} == {1, 2} and {n["style"] for n in named} == set(world.STYLES)
    assert len(set(prompts)) == 48
    assert ev.concept_accuracy(cs.images, obj) >= 0.9  # the probes read the references
    assert ev.concept_accuracy(cs.images, "star") <= 0.1


@pytest.mark.parametrize("obj", sorted(world.NOVEL_OBJECTS))
def test_validation_split_is_disjoint_from_the_test_prompts(obj):
    test, val = ev.concept_set(obj), ev.concept_set(obj, split="validation")
    assert len(val.templates) == len(val.seeds) == 48 and len(set(val.seeds)) == 48
    assert not set(val.templates) & set(test.templates) and not set(val.seeds) & set(test.seeds)
    assert not set(val.contexts) & set(test.contexts)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(val.images, test.images))
    named = [world.parse_prompt(p) for p in val.prompts("<new1> " + val.class_word)]
    assert all(n["background"] not in val.reference_backgrounds for n in named)
    with pytest.raises(ValueError, match="split"):
        ev.concept_set(obj, split="train")


def test_json_safe_writes_strict_json_with_nan_as_null():
    import json

    rec = {"any_leakage": float("nan"), "runs": [np.float32(0.25), (float("inf"), -float("inf"))], "name": "x", "n": 3}
    with pytest.raises(ValueError):
        json.dumps(rec, allow_nan=False)  # what the benches wrote before
    text = json.dumps(ev.json_safe(rec), allow_nan=False)
    assert json.loads(text) == {"any_leakage": None, "runs": [0.25, [None, None]], "name": "x", "n": 3}


def test_context_fidelity_ignores_the_object():
    cs = ev.concept_set("moon")
    images = cs.images[:2]
    prompts = [f"a moon on a {b} background, flat" for b in cs.reference_backgrounds[:2]]
    full = ev.prompt_fidelity(images, prompts)
    ctx = ev.prompt_fidelity(images, [p.replace("moon", "star") for p in prompts], attributes=ev.CONTEXT_ATTRIBUTES)
    assert ctx["n_shape"] == 0 and ctx["background"] == 1.0 and full["shape"] == 1.0
    with pytest.raises(ValueError, match="held-out"):
        ev.concept_set("star")


# ---------------------------------------------------------------------------- the protocol's ceiling
@pytest.fixture(scope="module")
def shipped():
    import impasto

    eng = impasto.Engine.from_pretrained("tiny", device="cpu")
    yield eng
    eng.close()


@pytest.mark.parametrize("obj", sorted(world.NOVEL_OBJECTS))
def test_probes_read_the_object_after_the_vae(shipped, obj):
    """No method can beat what the VAE keeps: the probes must read the held-out object in the
    references and in the held-out contexts drawn by the world, both after encode -> decode."""
    cs = ev.concept_set(obj)
    assert ev.concept_accuracy(ev.vae_round_trip(shipped.base.vae, cs.images), obj) >= 0.9
    drawn = cs.renders()[:24]
    assert ev.concept_accuracy(drawn, obj) >= 0.95
    assert ev.concept_accuracy(ev.vae_round_trip(shipped.base.vae, drawn), obj) >= 0.85
    # the contexts are the prompts' own: the world draws what each prompt names
    pf = ev.prompt_fidelity(drawn, cs.prompts(obj)[:24], attributes=ev.CONTEXT_ATTRIBUTES)
    assert pf["background"] == 1.0 and pf["count"] == 1.0 and pf["style"] >= 0.9
    blank = ev.vae_round_trip(shipped.base.vae, [Image.new("RGB", (32, 32), "gray")] * 2)
    assert ev.concept_accuracy(blank, obj) == 0.0


# ---------------------------------------------------------------------------- a short training run
SHORT_STEPS, SHORT_LR = 100, 2e-4  # × batch 4; docs/training.md, "The CI-sized run"
N_SEEDS, SAMPLE_STEPS = 32, 10


def _generate(eng, cs, phrase, adapters):
    import impasto

    reqs = [impasto.Request(p, adapters=adapters, seed=s, steps=SAMPLE_STEPS, guidance=7.5)
            for p, s in zip(cs.prompts(phrase)[:N_SEEDS], cs.seeds[:N_SEEDS])]
    outs = eng.generate_batch(reqs)
    assert all(o.error is None for o in outs)
    return [o.images[0] for o in outs]


def test_short_training_teaches_the_held_out_object(shipped, tmp_path):
    """Custom Diffusion on the sparkle's 8 references (exact masks, no rescale augmentation),
    100 steps: on 32 fixed held-out prompts and seeds the probes read the sparkle at least 0.25
    more often than in the base model's images of the class word."""
    from impasto.train import custom_diffusion

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine run many times slower
    try:
        _short_run(shipped, tmp_path, custom_diffusion)
    finally:
        torch.set_num_threads(threads)


def _short_run(shipped, tmp_path, custom_diffusion):
    cs = ev.concept_set("sparkle")
    r = custom_diffusion(shipped, cs.images, class_word=cs.class_word, masks=cs.masks, steps=SHORT_STEPS,
                         lr=SHORT_LR, batch_size=4, aug=False, seed=0, output=tmp_path / "sparkle", progress=False)
    assert len(r.losses) == SHORT_STEPS and all(np.isfinite(r.losses))
    base = ev.concept_accuracy(_generate(shipped, cs, cs.class_word, []), "sparkle")
    shipped.adapters.register("sparkle", r.path)
    try:
        trained = ev.concept_accuracy(_generate(shipped, cs, "<new1> " + cs.class_word, ["sparkle"]), "sparkle")
    finally:
        shipped.adapters.unregister("sparkle")
    assert trained >= base + 0.25, (base, trained)
