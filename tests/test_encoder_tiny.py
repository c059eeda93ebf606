"""What training the miniature encoder needs that does not depend on the training core: masked
reference renders with cross-reference pairs, a fresh adapter in the IP-Adapter base layout, and
the shipped tiny image encoder read by the serving path as it was trained (pixels in [-1, 1])."""

import numpy as np
import pytest
import torch

import impasto
from impasto.adapters import encoder as encoder_format
from impasto.adapters.families import encoder as encoder_family
from impasto.tiny import references, world
from impasto.tiny.probes import as_tensor


def test_render_with_mask_is_the_world_render_and_its_object():
    for i in range(12):
        rng = np.random.default_rng([3, i])
        scene = world.sample_scene(rng, style="flat", background="blue", count=1)
        image, mask = references.render_with_mask(scene, 100 + i)
        assert np.array_equal(image, world.render(scene, np.random.default_rng(100 + i)))
        bg = np.array(world.COLOURS["blue"])
        assert (np.abs(image[mask == 0].astype(int) - bg).max(axis=-1) <= 1).all()  # outside: background only
        assert (np.abs(image[mask == 1].astype(int) - bg).max(axis=-1) > 30).all()  # inside: the object
        assert 10 < (mask > 0.5).sum() < 32 * 32 / 2


def test_cross_reference_pairs():
    pairs = references.cross_reference_pairs(7, 24)
    moved = 0
    for p in pairs:
        assert (p.reference_scene.shape, p.reference_scene.colour, p.reference_scene.style) == (
            p.scene.shape, p.scene.colour, p.scene.style)
        assert p.reference_scene.count == 1 and p.target.shape == p.reference.shape == (32, 32, 3)
        s, r = p.scene, p.reference_scene
        moved += (s.size, s.position, s.background) != (r.size, r.position, r.background)
        assert (p.reference == references.GRAY).all(axis=-1).mean() > 0.4  # background masked out
    assert moved >= 20
    same = references.cross_reference_pairs(7, 6, same_render=True)
    for p in same:  # the ablation: the reference is the target itself, masked
        obj = ~(p.reference == references.GRAY).all(axis=-1)
        assert np.abs(p.reference[obj].astype(int) - p.target[obj].astype(int)).max() <= 128
        assert p.reference_scene == p.scene
    assert references.cross_reference_pairs(7, 3)[0].caption == pairs[0].caption  # a pure function of its seeds


def test_zero_shot_reference_of_a_novel_object():
    ref = references.object_reference("sparkle", seed=1)
    assert ref.shape == (32, 32, 3) and 0.03 < (~(ref == references.GRAY).all(axis=-1)).mean() < 0.5


@pytest.fixture(scope="module")
def tiny_engine():
    eng = impasto.Engine.from_pretrained("tiny", device="cpu")
    yield eng
    eng.close()


def test_shipped_encoder_reads_pixels_as_trained_and_a_fresh_adapter_serves(tiny_engine, tmp_path):
    eng = tiny_engine
    proj, ip = encoder_format.initial_weights(eng.base.unet, embed_dim=64, seed=0)
    for (key_id, _), (name, attn) in zip(sorted((int(k.split(".")[0]), k) for k in ip if "to_k" in k),
                                          eng.attn2.items()):
        assert torch.equal(ip[f"{key_id}.to_k_ip.weight"], attn.to_k.weight.float())  # tutorial_train's init
    path = str(tmp_path / "fresh.safetensors")
    encoder_format.save(path, proj, ip)
    info = eng.adapters.register("fresh", path)  # image_encoder defaults to the model's image_encoder/
    assert info.image_encoder.endswith("image_encoder") and info.image_tokens == 4
    _, processor = encoder_family.image_encoder(eng.adapters, info.image_encoder)
    renders = [world.sample(1, i)[0] for i in range(4)]
    from PIL import Image

    px = encoder_format.pixels(processor, [Image.fromarray(r) for r in renders])
    torch.testing.assert_close(px, as_tensor(np.stack(renders)), atol=1e-5, rtol=0)  # as tiny-CLIP was trained
    ref = Image.fromarray(references.object_reference("star", seed=2))
    out = eng.generate("a red star on a blue background", adapters=[("fresh", 0.5)], ip_adapter_image=ref, steps=3,
                       seed=0, output_type="np")
    plain = eng.generate("a red star on a blue background", steps=3, seed=0, output_type="np")
    assert np.isfinite(out.images).all() and np.abs(out.images - plain.images).max() > 1e-3
    eng.adapters.unregister("fresh")


def test_training_batch_drops_and_pairs():
    b = references.training_batch(5, 0, 1000)
    assert b["targets"].shape == (1000, 3, 32, 32) and -1 <= b["targets"].min() and b["targets"].max() <= 1
    drop_text = np.array([c == "" for c in b["captions"]])
    assert 0.07 < b["drop_image"].mean() < 0.13 and 0.07 < drop_text.mean() < 0.13  # IP-Adapter's 10 % marginals
    assert 0.03 < (b["drop_image"] & drop_text).mean() < 0.07
    none = references.training_batch(5, 0, 200, drop_rates=(0, 0, 0))
    assert not none["drop_image"].any() and all(none["captions"])
    again = references.training_batch(5, 0, 200, drop_rates=(0, 0, 0))
    assert np.array_equal(none["targets"], again["targets"])  # a pure function of (seed, step)
    assert not any(s.novel for s in b["scenes"])  # the seen world only: the novel objects stay held out
