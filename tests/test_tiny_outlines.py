"""impasto.tiny.outlines: procedural silhouettes for the encoder adapter's training stream, a pure
function of a seed, none near a held-out object's silhouette; the world renders them as a shape."""

import numpy as np
import pytest

from impasto.tiny import outlines, references, world


def _accepted_seeds(n, start=0):
    out, s = [], start
    while len(out) < n:
        try:
            outlines.outline(s)
            out.append(s)
        except ValueError:
            pass
        s += 1
    return out


def test_an_outline_is_a_pure_function_of_its_seed_and_the_families_are_many():
    a, b = outlines.candidate(12), outlines.candidate(12)
    assert np.array_equal(a["polygon"], b["polygon"]) and a["bites"] == b["bites"]
    seeds = _accepted_seeds(200)
    assert {outlines.candidate(s)["family"] for s in seeds} == set(outlines.FAMILIES)
    masks = {outlines.silhouette(outlines.candidate(s)["polygon"], outlines.candidate(s)["bites"]).tobytes()
             for s in seeds}
    assert len(masks) == 200  # 200 distinct silhouettes, not 8
    for s in seeds[:50]:  # unit scale: the farthest vertex at radius 1, as the seen shapes' circumscribed radius
        assert np.linalg.norm(outlines.candidate(s)["polygon"], axis=1).max() == pytest.approx(1.0)


def test_held_out_silhouettes_and_near_copies_are_rejected():
    star4 = lambda inner, turn=0.0: {"polygon": world._star(4, inner) @ np.array(  # noqa: E731
        [[np.cos(turn), np.sin(turn)], [-np.sin(turn), np.cos(turn)]]), "bites": []}
    near = [star4(0.3), star4(0.33, 0.4), star4(0.36, np.pi / 4),  # the sparkle, jittered and turned
            {"polygon": world.POLYGONS["arrow"] * np.array([-1.0, 1.0]), "bites": []},  # the arrow, mirrored
            {"polygon": world.POLYGONS["arrow"][:, ::-1] * 0.9, "bites": []},  # turned and smaller
            {"polygon": outlines._disk(), "bites": [(0.45, -0.05, 0.75)]},  # the crescent
            {"polygon": outlines._disk(), "bites": [(-0.05, 0.5, 0.72)]}]  # a crescent opening downwards
    for spec in near:
        assert max(outlines.held_out_iou(spec).values()) > outlines.EXCLUDE_IOU, spec
        assert not outlines.accepted(spec)
    # the seen shapes themselves are not near a held-out one: the rule does not reject everything
    for shape in ("circle", "square", "triangle", "star", "hexagon"):
        assert outlines.accepted({"polygon": outlines._world_geometry(shape)[0], "bites": []}), shape


def test_the_stream_never_draws_an_excluded_outline():
    rejected = [s for s in range(300) if not outlines.accepted(outlines.candidate(s))]
    assert len(rejected) > 20  # the generator does propose near copies: the filter is what keeps them out
    for s in rejected[:5]:
        with pytest.raises(ValueError, match="excluded"):
            outlines.outline(s)
    rng = np.random.default_rng(4)
    for _ in range(300):
        spec = outlines.candidate(outlines.draw_seed(rng))
        assert max(outlines.held_out_iou(spec).values()) <= outlines.EXCLUDE_IOU
        assert outlines.fill_fraction(spec) >= outlines.MIN_FILL


def test_the_world_renders_an_outline_with_its_mask_and_a_non_held_out_accent():
    s = _accepted_seeds(1, start=40)[0]
    scene = world.Scene(outlines.name(s), "green", "large", 1, "center", "black", "flat")
    image, mask = references.render_with_mask(scene, 3)
    assert np.array_equal(image, world.render(scene, np.random.default_rng(3)))
    want = outlines.silhouette(outlines.candidate(s)["polygon"], outlines.candidate(s)["bites"])
    assert 0.5 < mask.sum() / (want.sum() * (world.SIZES["large"] / outlines._UNIT) ** 2) < 1.5
    assert (np.abs(image[mask < 0.01].astype(int) - world.EXTRA_BG["black"]).max()) <= 1
    pairs = {(o.colour, o.accent) for o in world.NOVEL_OBJECTS.values()}
    seen_accent = 0
    for s in _accepted_seeds(200):
        for c in world.COLOUR_NAMES:
            a = outlines.accent(outlines.name(s), c)
            assert a != c and (c, a) not in pairs
            seen_accent += a is not None
    assert 0.3 < seen_accent / (200 * 8) < 0.7  # about half carry an accent, as the held-out objects do


def test_names_and_bad_names():
    assert outlines.is_outline("outline-7") and not outlines.is_outline("star") and not outlines.is_outline("outline-x")
    assert outlines.seed_of(outlines.name(123)) == 123
    with pytest.raises(ValueError, match="not a procedural outline"):
        outlines.seed_of("sparkle")


def test_the_towers_shape_batches_take_outline_groups_only_when_asked():
    from impasto.tiny.train import canonical_silhouette, shape_encoder_batch

    plain, zero = shape_encoder_batch(6, 3, 64), shape_encoder_batch(6, 3, 64, procedural=0.0)
    assert np.array_equal(plain["images"], zero["images"]) and plain["captions"] == zero["captions"]
    assert "outline" not in zero  # procedural=0: the shipped tower's stream, bit for bit
    b = shape_encoder_batch(6, 3, 64, procedural=0.5)
    assert np.array_equal(b["images"], shape_encoder_batch(6, 3, 64, procedural=0.5)["images"])  # (seed, step)
    groups = [b["outline"][g * 8:(g + 1) * 8] for g in range(8)]
    drawn = [g for g in groups if outlines.is_outline(g[0])]
    assert 0 < len(drawn) < 8
    for g in range(8):
        rows = slice(g * 8, (g + 1) * 8)
        if outlines.is_outline(groups[g][0]):  # 8 distinct outlines, none near a held-out object
            assert (b["shape"][rows] == -1).all() and len(set(groups[g])) == 8
            for n in groups[g]:
                assert outlines.accepted(outlines.candidate(outlines.seed_of(n)))
                assert canonical_silhouette(n).sum() > 10
        else:  # a seen group is the plain stream's group
            assert np.array_equal(b["images"][rows], plain["images"][rows])
