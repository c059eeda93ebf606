"""impasto.train.encoder: the miniature encoder adapter trained through the one loop, written in
IP-Adapter's base layout and read by the serving path; the shipped adapter's zero-shot fidelity;
the CLI; the server's ip_adapter_image."""

import base64
import io
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import impasto
from impasto import eval as ev
from impasto.adapters import encoder as encoder_format
from impasto.adapters.families import FAMILIES
from impasto.api import ReferenceImages
from impasto.adapters.families import Use
from impasto.tiny import SHIPPED_DIR, references, world
from impasto.train import TrainInputError, encoder
from impasto.train.encoder import EncoderAdapter, EncoderTrainer

SHIPPED = os.path.join(SHIPPED_DIR, "ip_adapter", "ip_adapter.safetensors")
STEPS = 30


@pytest.fixture(scope="module")
def eng():
    e = impasto.Engine.from_pretrained("tiny", device="cpu")
    yield e
    e.close()


@pytest.fixture(scope="module")
def trained(eng, tmp_path_factory):
    """One short run (the module's only training) and a held-out batch scored before and after."""
    torch.manual_seed(0)
    out = str(tmp_path_factory.mktemp("enc"))
    method = EncoderAdapter(eng, seed=0)
    trainer = EncoderTrainer(eng, method, seed=0, steps=STEPS, lr=1e-3, batch_size=4)
    held = EncoderTrainer(eng, EncoderAdapter(eng, seed=0), seed=1, steps=1, lr=0.0, batch_size=16)
    held.step = 10_000  # another stream position: never a training batch
    batch = held.make_batch()
    with torch.no_grad():
        before = float(held.loss(batch))
    result = impasto.train.train(trainer, out, progress=False)
    held.method.proj, held.method.ip = method.proj, method.ip  # score the trained tensors
    with torch.no_grad():
        after = float(held.loss(batch))
    return result, method, before, after


def test_training_lowers_the_held_out_loss_and_writes_the_ip_adapter_base_layout(eng, trained):
    result, method, before, after = trained
    assert result.steps == STEPS and len(result.losses) == STEPS and np.isfinite(result.losses).all()
    assert after < 0.9 * before, (before, after)  # a batch it never trained on
    assert set(result.files) == {"weights"}  # trained on the base model's own encoder: nothing copied
    state = load_file(result.files["weights"])
    ids = encoder_format.layer_ids(eng.base.unet)
    assert set(state) == {f"image_proj.{k}" for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")} | {
        f"ip_adapter.{i}.to_{c}_ip.weight" for i in ids.values() for c in "kv"}
    for k, p in method.parameters().items():
        assert torch.equal(state[k], p.detach().float()), k
    assert state["image_proj.proj.weight"].shape == (4 * eng.base.unet.config.cross_attention_dim, 64)
    init = encoder_format.initial_weights(eng.base.unet, 64, seed=0)[1]
    assert any(not torch.equal(state[f"ip_adapter.{k}"], v) for k, v in init.items())  # K'/V' trained


def test_the_trained_file_serves_with_the_training_forwards_image_kv(eng, trained):
    result, method, _, _ = trained
    info = eng.adapters.register("trained-enc", result.files["weights"])
    try:
        assert info.family == "encoder" and info.format == encoder_format.BASE and info.image_tokens == 4
        ref = Image.fromarray(references.object_reference("heart", seed=3, colour="red"))
        # the serving plan's K'/V' for this image equal the training forward's (same tensors, same math)
        family = FAMILIES["encoder"]
        use = Use(family, "trained-enc", 1.0, {"image": ReferenceImages([ref])}, info, family.load(eng.adapters, info))
        planned = family.image_kv(eng.adapters, [[use]])[0]
        method.features = method.embed([np.asarray(ref)], np.array([False]))
        tokens = encoder_format.project(method.file(), method.features)[0]
        for name, (W_k, W_v) in method.file().layers.items():
            k, v = encoder_format.image_kv(tokens, W_k, W_v)
            torch.testing.assert_close(planned.kv[name][0], k.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(planned.kv[name][1], v.detach(), atol=1e-5, rtol=1e-5)
        method.features = None
        prompt = "a star on a blue background, flat"
        out = eng.generate(prompt, adapters=[("trained-enc", 1.0)], ip_adapter_image=ref, steps=3, seed=0,
                           output_type="np")
        plain = eng.generate(prompt, steps=3, seed=0, output_type="np")
        assert np.isfinite(out.images).all() and np.abs(out.images - plain.images).max() > 1e-2
    finally:
        eng.adapters.unregister("trained-enc")


def test_coarse_captions_leave_the_shape_to_the_reference():
    from impasto.tiny import world
    from impasto.train.encoder import CATEGORY, COARSE_RATES, coarse_caption, training_batch

    s = world.Scene("cross", "orange", "large", 1, "center", "blue", "striped")
    full = "a large orange cross on a blue background, striped"
    assert coarse_caption(full, s, "category") == "a large star on a blue background, striped"
    assert coarse_caption(full, s, "none") == "a large on a blue background, striped"
    assert coarse_caption(full, s, "full") == full and coarse_caption("", s, "none") == ""
    two = world.Scene("heart", "orange", "small", 2, "center", "white", "flat")
    assert coarse_caption("two orange hearts on a white background", two, "category") == "two circles on a white background"
    assert coarse_caption("an orange heart on a white background", replace(two, count=1), "category") == (
        "a circle on a white background")
    with pytest.raises(ValueError, match="mode"):
        coarse_caption(full, s, "fine")
    with pytest.raises(ValueError, match="not in the caption"):
        coarse_caption("a red star on a blue background", s, "category")
    b = training_batch(5, 0, 800)
    modes = np.array(b["modes"])
    assert abs((modes == "category").mean() - COARSE_RATES[0]) < 0.05 and abs((modes == "none").mean() - COARSE_RATES[1]) < 0.04
    for c, sc, m in zip(b["captions"], b["scenes"], b["modes"]):
        if c and m != "full":  # a coarse caption names neither the exact shape nor the colour
            words = set(c.replace(",", "").split())
            category = {CATEGORY[sc.shape], CATEGORY[sc.shape] + "s"}
            exact = {sc.shape, world.PLURALS.get(sc.shape, sc.shape + "s")} - category
            assert sc.colour not in words and not exact & words, (c, sc)
            assert bool(category & words) == (m == "category"), (c, m)
    assert not training_batch(5, 0, 200, coarse_rates=(0, 0))["modes"].count("category")
    assert training_batch(5, 3, 50)["captions"] == training_batch(5, 3, 50)["captions"]  # a pure function of (seed, step)
    with pytest.raises(ValueError, match="coarse rates"):
        training_batch(5, 0, 4, coarse_rates=(0.8, 0.4))


def test_turned_outlines_turn_target_reference_and_position_word_alike():
    from impasto.train.encoder import ORIENTATION_POSITIONS, ORIENTATIONS, TURNS, orient, orient_caption, training_batch

    plain, same = training_batch(5, 0, 300), training_batch(5, 0, 300, turn=0.0)
    assert np.array_equal(plain["targets"], same["targets"]) and plain["captions"] == same["captions"]
    b = training_batch(5, 0, 300, turn=1.0)
    turned = [i for i, o in enumerate(b["orientations"]) if o is not None]
    can = [i for i, s in enumerate(b["scenes"]) if s.shape in TURNS and s.background not in world.GRADIENTS
           and s.style != "striped"]
    assert turned == can and len(turned) > 60  # share 1: every row that can turn does
    assert {b["orientations"][i] for i in turned} == set(ORIENTATIONS)
    for i in range(300):
        o, s = b["orientations"][i], b["scenes"][i]
        if o is None:
            assert np.array_equal(b["targets"][i], plain["targets"][i]) and b["captions"][i] == plain["captions"][i]
            continue
        assert o in TURNS[s.shape]
        assert np.array_equal(b["targets"][i], orient(plain["targets"][i], o, axes=(1, 2)))
        assert np.array_equal(b["references"][i], orient(plain["references"][i], o))
    # the picture and the position word turn the same way: a turned render sits where the moved word says
    for o in ORIENTATIONS:
        for pos in ("top", "left"):
            scene = world.Scene("triangle", "red", "small", 1, pos, "blue", "flat")
            _, m = references.render_with_mask(scene, 3)
            _, want = references.render_with_mask(replace(scene, position=ORIENTATION_POSITIONS[o][pos]), 3)
            centroid = lambda x: np.argwhere(x > 0.5).mean(0)  # noqa: E731
            assert np.abs(centroid(orient(m, o)) - centroid(want)).max() < 4, (o, pos)
        cap = orient_caption("a red heart on the left on a blue background", replace(scene, position="left"), o)
        assert cap == f"a red heart {world.POSITION_PHRASES[ORIENTATION_POSITIONS[o]['left']]} on a blue background"
    with pytest.raises(ValueError, match="share"):
        training_batch(5, 0, 4, turn=1.5)
    with pytest.raises(ValueError, match="orientation"):
        orient(np.zeros((4, 4)), "rot45")


def test_procedural_outlines_replace_a_share_of_rows_and_never_a_held_out_one():
    from impasto.tiny import outlines
    from impasto.train.encoder import CATEGORY, outline_caption, procedural_rows, training_batch

    plain, zero = training_batch(5, 2, 200), training_batch(5, 2, 200, procedural=0.0)
    assert np.array_equal(plain["targets"], zero["targets"]) and plain["captions"] == zero["captions"]
    assert all(np.array_equal(a, b) for a, b in zip(plain["references"], zero["references"]))
    assert not any(zero["procedural"])  # S = 0: exactly the stream without it
    b, again = training_batch(5, 2, 200, procedural=0.5), training_batch(5, 2, 200, procedural=0.5)
    assert np.array_equal(b["targets"], again["targets"]) and b["captions"] == again["captions"]  # (seed, step)
    assert all(np.array_equal(x, y) for x, y in zip(b["references"], again["references"]))
    flags = b["procedural"]
    assert flags == list(procedural_rows(5, 2, 200, 0.5)) and 70 < sum(flags) < 130
    seen_words = set(world.SHAPES) | {world.PLURALS.get(s, s + "s") for s in world.SHAPES}
    for i in range(200):
        s = b["scenes"][i]
        if not flags[i]:  # every other row is the plain stream's, bit for bit
            assert np.array_equal(b["targets"][i], plain["targets"][i]) and b["captions"][i] == plain["captions"][i]
            continue
        assert outlines.is_outline(s.shape)
        spec = outlines.candidate(outlines.seed_of(s.shape))
        assert max(outlines.held_out_iou(spec).values()) <= outlines.EXCLUDE_IOU  # never near a held-out object
        c, m = b["captions"][i], b["modes"][i]
        assert "outline-" not in c and (c == "") == (plain["captions"][i] == "")  # a dropped text stays dropped
        words = set(c.replace(",", "").split())
        word = CATEGORY[outlines.outline(outlines.seed_of(s.shape))["nearest"]]
        if c:  # the nearest seen category's word (full: with the colour), or no object word
            assert (word in words or word + "s" in words) == (m != "none"), (c, m)
            assert (s.colour in words) == (m == "full") and not (words & seen_words) - {word, word + "s"}, c
        # the reference is another render of the SAME outline, colour and style, masked
        pair = references.outline_pair(5, 2, i)
        assert pair.reference_scene.shape == s.shape and pair.reference_scene.colour == s.colour
        assert np.array_equal(pair.reference, b["references"][i]) and pair.reference_scene.count == 1
        assert not np.array_equal(pair.target, pair.reference)
    one = next(s.shape for s, f in zip(b["scenes"], flags) if f)
    assert outline_caption(f"a red {one} on a blue background", world.Scene(
        one, "red", "medium", 1, "center", "blue", "flat"), "none") == "a on a blue background"
    with pytest.raises(ValueError, match="procedural"):
        training_batch(5, 0, 4, procedural=1.5)


def test_plus_variant_trains_and_serves_with_the_training_forwards_image_kv(eng, tmp_path):
    method = EncoderAdapter(eng, seed=0, variant=encoder_format.PLUS, tokens=16)
    trainer = EncoderTrainer(eng, method, seed=0, steps=2, lr=1e-3, batch_size=2)
    result = impasto.train.train(trainer, str(tmp_path), progress=False)
    info = eng.adapters.register("trained-plus", result.files["weights"])  # the Resampler layout, read by detection
    try:
        assert info.format == encoder_format.PLUS and info.image_tokens == 16
        ref = Image.fromarray(references.object_reference("cross", seed=5, colour="green"))
        family = FAMILIES["encoder"]
        use = Use(family, "trained-plus", 1.0, {"image": ReferenceImages([ref])}, info, family.load(eng.adapters, info))
        planned = family.image_kv(eng.adapters, [[use]])[0]
        feats = method.embed([np.asarray(ref)], np.array([False]))  # [1, P, E'] hidden_states[-2]
        assert feats.shape[1] > 1
        tokens = encoder_format.project(method.file(), feats)[0]
        for name, (W_k, W_v) in method.file().layers.items():
            k, v = encoder_format.image_kv(tokens, W_k, W_v)
            torch.testing.assert_close(planned.kv[name][0], k.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(planned.kv[name][1], v.detach(), atol=1e-5, rtol=1e-5)
        # a dropped row is the Plus variant's unconditional input: the encoder of a zero image
        zero = method.model(pixel_values=torch.zeros(1, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(method.embed([np.asarray(ref)], np.array([True])), zero.float())
    finally:
        eng.adapters.unregister("trained-plus")


def test_dropped_rows_get_the_base_variants_unconditional_tokens(eng):
    method = EncoderAdapter(eng, seed=0)
    refs = [references.object_reference("star", seed=1), references.object_reference("circle", seed=2)]
    e = method.embed(refs, np.array([True, False]))
    assert torch.equal(e[0], torch.zeros_like(e[0])) and e[1].abs().sum() > 0  # the zero embedding, as serving's uncond


def test_bad_settings_are_named(eng, tmp_path):
    with pytest.raises(TrainInputError, match="output"):
        encoder(eng, steps=1)
    with pytest.raises(TrainInputError, match="tokens"):
        encoder(eng, steps=1, tokens=0, output=str(tmp_path))
    with pytest.raises(TrainInputError, match="image_encoder"):
        encoder(eng, steps=1, output=str(tmp_path), image_encoder=str(tmp_path / "nope"))
    with pytest.raises(TrainInputError, match="steps"):
        encoder(eng, steps=0, output=str(tmp_path))
    with pytest.raises(TrainInputError, match="variant"):
        encoder(eng, steps=1, output=str(tmp_path), variant="plus-plus")
    with pytest.raises(ValueError, match="procedural"):
        encoder(eng, steps=1, output=str(tmp_path), procedural=-0.1)


def test_cli_train_encoder(tmp_path, capsys):
    from impasto.cli import main

    out = tmp_path / "cli"
    tower = os.path.join(SHIPPED_DIR, "ip_adapter", "image_encoder")  # not the base model's image_encoder/
    assert main(["train", "encoder", "-o", str(out), "--steps", "2", "--batch-size", "2", "-q",
                 "--image-encoder", tower, "--procedural", "0.5"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert encoder_format.is_ip_adapter(out / "ip_adapter.safetensors")
    # the encoder it was trained on ships beside the file, where registration looks first
    copied = out / "image_encoder" / "model.safetensors"
    assert copied.read_bytes() == open(os.path.join(tower, "model.safetensors"), "rb").read()
    e = impasto.Engine.from_pretrained("tiny", device="cpu")
    try:
        assert e.adapters.register("cli", str(out / "ip_adapter.safetensors")).image_encoder == str(
            (out / "image_encoder").resolve())
    finally:
        e.close()


def test_server_passes_ip_adapter_image(eng):
    from impasto.errors import RequestError
    from impasto.serve import build
    from impasto.serve.schemas import ImageGenerationRequest

    eng.adapters.register("shipped-enc", SHIPPED)
    try:
        ref = Image.fromarray(references.object_reference("heart", seed=4, colour="pink"))
        buf = io.BytesIO()
        ref.save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()

        class Backend:
            default_size, limits = (32, 32), eng.limits

        body = ImageGenerationRequest(prompt="a heart on a green background, flat", seed=3, num_inference_steps=3,
                                      adapters=[{"name": "shipped-enc", "scale": 0.8}],
                                      ip_adapter_image="data:image/png;base64," + b64)
        (image,) = build.openai_images(body, Backend)
        got = eng.generate_batch([image.request()])[0]
        want = eng.generate("a heart on a green background, flat", adapters=[("shipped-enc", 0.8)],
                            ip_adapter_image=ref, steps=3, seed=3, guidance=7.5)
        assert got.error is None
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(want.images[0]))
        with pytest.raises(RequestError, match=r"ip_adapter_image\[1\]: not base64"):
            build.openai_images(ImageGenerationRequest(prompt="x", ip_adapter_image=[b64, "@@"]), Backend)
    finally:
        eng.adapters.unregister("shipped-enc")


def test_shipped_adapter_loads():
    e = impasto.Engine.from_pretrained("tiny", device="cpu")
    try:
        info = e.adapters.register("ip", SHIPPED)
        assert info.family == "encoder" and info.format == encoder_format.BASE
        assert os.path.getsize(SHIPPED) <= 5 * 2**20
    finally:
        e.close()


def test_shipped_adapter_takes_the_colour_the_prompt_leaves_open(eng):
    """The prompt names a seen shape and no colour, the reference is that shape in one of four
    colours: with the shipped adapter the colour probe reads the reference's colour >= 0.25 more
    often than without it (measured: 5 of 16 against the base's 1, at the bound; the adapter shipped
    before it, step 2000 of the same run, 8 of 16; the first, full-caption adapter 1 of 16)."""
    eng.adapters.register("col", SHIPPED)
    try:
        reqs, want = {None: [], "col": []}, []
        for c in ("red", "green", "yellow", "white"):
            for j, (shape, bg) in enumerate((("star", "blue"), ("heart", "black"), ("circle", "purple"), ("square", "gray"))):
                ref = Image.fromarray(references.object_reference(shape, seed=20 + j, colour=c))
                prompt = f"a {shape} on a {bg} background, flat"
                reqs[None].append(impasto.Request(prompt, seed=900 + j, steps=10, guidance=7.5))
                reqs["col"].append(impasto.Request(prompt, seed=900 + j, steps=10, guidance=7.5, adapters=[("col", 1.0)],
                                                   ip_adapter_image=ref))
                want.append(c)
        share = {}
        for k, rs in reqs.items():
            outs = eng.generate_batch(rs)
            assert all(o.error is None for o in outs)
            probs = ev._read([o.images[0] for o in outs], None)
            share[k] = np.mean([ev.CLASSES["colour"][i] == w for i, w in zip(probs["colour"].argmax(1), want)])
        assert share["col"] >= share[None] + 0.25, share
    finally:
        eng.adapters.unregister("col")


ZERO_SHOT_OBJECT = "sparkle"


@pytest.fixture(scope="module")
def zero_shot(eng):
    """{object: (base, shipped adapter)} concept fidelity on 32 fixed seeds of the protocol's
    held-out prompts (the class word, one masked reference in; 10 sampling steps), the base on the
    same prompts and seeds; every held-out object (neither the base nor the encoder saw them)."""
    eng.adapters.register("zs", SHIPPED)
    try:
        def run(reqs):
            outs = eng.generate_batch(reqs)
            assert all(o.error is None for o in outs)
            return [o.images[0] for o in outs]

        out = {}
        for obj in world.NOVEL_OBJECTS:
            cs = ev.concept_set(obj)
            out[obj] = tuple(ev.concept_accuracy(run(ev.zero_shot_requests(cs, name, n=32, steps=10)), obj)
                             for name in (None, "zs"))
        return out
    finally:
        eng.adapters.unregister("zs")


def test_shipped_adapter_zero_shot_concept_fidelity(zero_shot):
    """The encoder adds >= 0.25 concept fidelity on the sparkle, one object in (measured: 0.094 ->
    0.406; 0.083 -> 0.417 at 25 steps on all 48 test prompts). The adapter shipped before it (step
    2000 of the same run) gave 0.375 here, the one on tiny-CLIP's tower 0.125."""
    base, shot = zero_shot[ZERO_SHOT_OBJECT]
    assert shot >= base + 0.25, (base, shot)


@pytest.mark.xfail(strict=True, reason="target not met: the mean over the three held-out objects rises by +0.135 "
                   "here (0.031 -> 0.167; +0.146 at 25 steps): the sparkle +0.31, the moon +0.03, the arrow +0.06. "
                   "An oracle adapter trained with the held-out objects reaches 0.319 on validation, so the limit is "
                   "the adapter's generalization from 8 seen outlines, not the frozen UNet (docs/training.md, 'The "
                   "limit, tested directly'); strict: passing would be news")
def test_shipped_adapter_zero_shot_concept_fidelity_on_every_held_out_object(zero_shot):
    """The issue's target: the mean over the held-out objects is >= the base's + 0.25."""
    base = np.mean([b for b, _ in zero_shot.values()])
    shot = np.mean([s for _, s in zero_shot.values()])
    assert shot >= base + 0.25, zero_shot
