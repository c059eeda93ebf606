"""The customization protocol's data: eval.concept_set, concept_accuracy, context prompt fidelity."""

import numpy as np
import pytest

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


def test_context_fidelity_ignores_the_object():
    cs = ev.concept_set("moon")
    images = cs.images[:2]
    prompts = [f"a moon on a {b} background, flat" for b in cs.reference_backgrounds[:2]]
    full = ev.prompt_fidelity(images, prompts)
    ctx = ev.prompt_fidelity(images, [p.replace("moon", "star") for p in prompts], attributes=ev.CONTEXT_ATTRIBUTES)
    assert ctx["n_shape"] == 0 and ctx["background"] == 1.0 and full["shape"] == 1.0
    with pytest.raises(ValueError, match="held-out"):
        ev.concept_set("star")
