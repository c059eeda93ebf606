"""The miniature model's world (engine/tiny/world.py), its probes and the metrics of impasto.eval."""

import os

import numpy as np
import pytest

from impasto.tiny import SHIPPED_DIR, world


def test_vocabulary_is_as_wide_as_the_issue_asks():
    assert len(world.SHAPES) >= 8
    assert len(world.COLOURS) >= 8 and {"red", "green", "blue", "yellow"} <= set(world.COLOURS)
    assert len(world.STYLES) >= 5 and {"flat", "striped", "dotted", "outlined", "noisy"} <= set(world.STYLES)
    assert any(b in world.GRADIENTS for b in world.BACKGROUNDS) and "blue" in world.BACKGROUNDS
    assert world.COUNTS == (1, 2) and len(world.SIZES) >= 2 and len(world.POSITIONS) >= 3
    assert len(world.NOVEL_OBJECTS) >= 3 and len(world.NOVEL_STYLES) >= 3
    for obj in world.NOVEL_OBJECTS.values():
        assert obj.shape not in world.SHAPES and obj.supercategory in world.SHAPES
    assert not set(world.NOVEL_STYLES) & set(world.STYLES)


def test_same_seed_same_image_and_caption_any_order():
    a = [world.sample(11, i) for i in range(6)]
    b = [world.sample(11, i) for i in reversed(range(6))][::-1]
    for (ia, sa, ca), (ib, sb, cb) in zip(a, b):
        assert np.array_equal(ia, ib) and sa == sb and ca == cb
    assert not np.array_equal(world.sample(12, 0)[0], a[0][0])
    assert a[0][0].shape == (32, 32, 3) and a[0][0].dtype == np.uint8


def test_base_stream_never_shows_held_out_objects_or_styles():
    d = world.dataset(21, 300)
    assert not any(s.novel for s in d["scenes"])
    assert len({s.shape for s in d["scenes"]}) == len(world.SHAPES)
    mixed = world.dataset(21, 300, novel_objects=0.3, novel_styles=0.3)
    assert {s.shape for s in mixed["scenes"]} & set(world.NOVEL_OBJECTS)
    assert {s.style for s in mixed["scenes"]} & set(world.NOVEL_STYLES)


def test_captions_say_what_is_drawn():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = world.sample_scene(rng, novel_objects=0.2, novel_styles=0.2)
        named = world.parse_prompt(world.caption(s))  # the full caption names everything
        assert named["shape"] == s.shape and named["colour"] == s.colour and named["count"] == s.count
        assert named["background"] == s.background and named["style"] == s.style
        assert s.colour not in world.GRADIENTS.get(s.background, (s.background,))
    s = world.Scene("star", "red", "small", 2, "center", "blue", "striped")
    assert world.caption(s) == "two small red stars on a blue background, striped"
    s = world.Scene("cross", "orange", "medium", 1, "center", "orange to purple gradient", "flat")
    assert world.caption(s) == "an orange cross on an orange to purple gradient background, flat"


def test_pairs_share_content_and_differ_in_style():
    s = world.Scene("heart", "green", "large", 1, "center", "white", "pixelated")
    plain, styled = world.render_pair(s, seed=3)
    again, _ = world.render_pair(s, seed=3)
    assert np.array_equal(plain, again)
    assert np.array_equal(plain, world.render(world.Scene(**{**s.__dict__, "style": "flat"}), np.random.default_rng(3)))
    assert np.abs(plain.astype(int) - styled.astype(int)).mean() > 1.0
    # same content: the mean colour of the pair is close
    assert np.abs(plain.reshape(-1, 3).mean(0) - styled.reshape(-1, 3).mean(0)).max() < 8


def test_images_show_their_colours():
    """A large flat red circle on blue: the centre is red, a corner is blue."""
    im = world.render(world.Scene("circle", "red", "large", 1, "center", "blue", "flat"), np.random.default_rng(0))
    assert tuple(im[16, 16]) == world.COLOURS["red"]
    assert tuple(im[1, 1]) == world.COLOURS["blue"]


shipped = pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED_DIR, "probes", "probes.safetensors")),
                             reason="the trained tiny model is not shipped in this checkout")


@shipped
def test_probes_read_unseen_seeds_at_least_95_percent():
    """Probes on 600 images of a generator seed no training stage used, novel objects and styles
    included."""
    from impasto.tiny.probes import load_probes

    d = world.dataset(987, 600, novel_objects=0.25, novel_styles=0.3)
    probs = load_probes().read(d["images"])
    for k in ("shape", "colour", "background", "style", "count"):
        acc = (probs[k].argmax(1) == d["labels"][k]).mean()
        assert acc >= 0.95, (k, acc)


@shipped
def test_metrics_on_world_images():
    import impasto.eval as ev

    # prompt fidelity: images rendered from their own captions score high; shuffled ones low
    d = world.dataset(555, 120)
    good = ev.prompt_fidelity(d["images"], d["captions"])
    bad = ev.prompt_fidelity(d["images"], d["captions"][1:] + d["captions"][:1])
    assert good["colour"] >= 0.9 and good["shape"] >= 0.9 and good["overall"] >= 0.9
    assert bad["overall"] < 0.5
    assert good["n_colour"] == 120

    # concept fidelity: a novel object's images are closer to its references than other objects'
    rng = np.random.default_rng(1)
    ref = np.stack([world.render(world.sample_scene(rng, shape="sparkle"), rng) for _ in range(8)])
    same = np.stack([world.render(world.sample_scene(rng, shape="sparkle"), rng) for _ in range(16)])
    other = np.stack([world.render(world.sample_scene(rng, shape="square"), rng) for _ in range(16)])
    fs, fo = ev.concept_fidelity(same, ref, "sparkle"), ev.concept_fidelity(other, ref, "sparkle")
    assert fs["concept_accuracy"] >= 0.9 and fo["concept_accuracy"] <= 0.1
    assert fs["image_similarity"] > fo["image_similarity"] and fs["probe_similarity"] > fo["probe_similarity"]

    # style strength: pixelated scenes read as pixelated, flat ones do not
    scenes = [world.sample_scene(rng) for _ in range(16)]
    pairs = [world.render_pair(world.Scene(**{**s.__dict__, "style": "pixelated"}), i) for i, s in enumerate(scenes)]
    plain, styled = np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs])
    assert ev.style_strength(styled, "pixelated")["confidence"] > 0.8
    assert ev.style_strength(plain, "pixelated")["confidence"] < 0.2

    # content leakage: red hearts shown for prompts asking for blue squares is leakage
    hearts = np.stack([world.render(world.sample_scene(rng, shape="heart", colour="red"), rng) for _ in range(10)])
    squares = np.stack([world.render(world.sample_scene(rng, shape="square", colour="blue"), rng) for _ in range(10)])
    ask = "a blue square on a white background"
    assert ev.content_leakage(hearts, ask, ("heart", "red"))["leakage"] >= 0.9
    assert ev.content_leakage(squares, ask, ("heart", "red"))["leakage"] <= 0.1
    assert ev.content_leakage(hearts, "a red heart on a blue background", ("heart", "red"))["n"] == 0


@shipped
def test_perfusion_covariance_inverts():
    from safetensors import safe_open

    import torch

    path = os.path.join(SHIPPED_DIR, "perfusion_covariance.safetensors")
    with safe_open(path, "pt") as f:
        c_inv, c, meta = f.get_tensor("C_inv"), f.get_tensor("C"), f.metadata()
    d = int(meta["dim"])
    assert c_inv.shape == (d, d) and c_inv.dtype == torch.float32 and "uncentered" in meta["note"]
    # C is ill-conditioned (cond ~ 5e7: some text directions barely vary over the world's
    # captions), so compare with the float64 inverse of the stored C rather than C_inv @ C = I.
    ref = torch.linalg.inv(c.double())
    assert ((c_inv.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.allclose(c_inv, c_inv.T, rtol=1e-4, atol=1e-5 * c_inv.abs().max().item())
    assert torch.linalg.eigvalsh(c.double()).min() > 0  # C is positive definite


# Digests of what the world's streams and the evaluation sets drew before world.EXTRA_STYLES was
# added (sha256 of images, captions and labels): adding a style must not change any draw.
DRAW_DIGESTS = {"base": "3b8a0907af4da76a", "probe": "de690ac273c9e2c4", "fidelity_prompts": "06a24bd9cf5baba2",
                "concept_moon": "54f4e8c8c19ac0ca", "pair_prompts": "4ed1a0ffe7f90004",
                "style_pair_wavy": "b950a6d324a309fd"}
# sha256 of the shipped probes' tensors as first trained (fp16), before the extra styles' detectors
PROBE_DIGEST_8_STYLES = "07534ec1c4046a04"


def _digest(*parts):
    import hashlib

    m = hashlib.sha256()
    for p in parts:
        m.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return m.hexdigest()[:16]


def test_the_added_style_changes_no_draw():
    import impasto.eval as ev

    got = {}
    d = world.dataset(1, 200)
    got["base"] = _digest(d["images"], d["captions"], d["labels"]["style"])
    d = world.dataset(2, 200, novel_objects=0.25, novel_styles=0.3)
    got["probe"] = _digest(d["images"], d["captions"], d["labels"]["style"])
    got["fidelity_prompts"] = _digest(ev.fidelity_prompts(64))
    cs = ev.concept_set("moon")
    got["concept_moon"] = _digest(cs.prompts("<new1> circle"), cs.seeds, [np.asarray(i) for i in cs.images])
    got["pair_prompts"] = _digest(ev.pair_prompts(64))
    got["style_pair_wavy"] = _digest(*[np.asarray(x) for x in ev.style_pair("wavy")[:2]])
    assert got == DRAW_DIGESTS
    # never drawn at random, drawn where named, and a different image from every other style
    rng = np.random.default_rng(0)
    assert not {world.sample_scene(rng, novel_styles=1.0).style for _ in range(500)} & set(world.EXTRA_STYLES)
    s = world.Scene("heart", "green", "large", 1, "center", "white", "banded")
    plain, banded = world.render_pair(s, seed=3)
    assert np.abs(plain.astype(int) - banded.astype(int)).mean() > 1.0
    assert world.parse_prompt(world.caption(s))["style"] == "banded" and s.novel


@shipped
def test_the_added_style_detector_leaves_every_other_weight_and_reads_the_style():
    import hashlib

    from safetensors.torch import load_file

    import impasto.eval as ev
    from impasto.tiny.probes import load_probes

    st = load_file(os.path.join(SHIPPED_DIR, "probes", "probes.safetensors"))
    m = hashlib.sha256()
    for k in sorted(k for k in st if not k.startswith("extra.")):
        m.update(k.encode())
        m.update(st[k].contiguous().numpy().tobytes())
    assert m.hexdigest()[:16] == PROBE_DIGEST_8_STYLES  # the original probes, bit for bit
    assert {k.split(".")[1] for k in st if k.startswith("extra.")} == set(world.EXTRA_STYLES)
    # banded renders (a stream the row was not fitted on) read as banded, flat ones do not
    rng = np.random.default_rng([77])
    pairs = [world.render_pair(world.sample_scene(rng, count=1, size="large", style="banded"), i) for i in range(32)]
    probes = load_probes()
    assert ev.style_strength(np.stack([s for _, s in pairs]), "banded", probes)["accuracy"] >= 0.9
    assert ev.style_strength(np.stack([p for p, _ in pairs]), "banded", probes)["accuracy"] <= 0.05
