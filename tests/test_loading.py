"""Model loading: local folders only, every failure a ModelLoadError naming the component."""

import os
import shutil

import pytest

import impasto


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_missing_folder():
    with pytest.raises(impasto.ModelLoadError, match="does not exist"):
        impasto.Engine.from_pretrained("/nonexistent/model")


@pytest.mark.parametrize("component", ["unet", "text_encoder", "tokenizer", "vae", "scheduler"])
def test_missing_component(tiny_dir, tmp_path, component):
    dst = _copy(tiny_dir, tmp_path)
    shutil.rmtree(dst / component)
    with pytest.raises(impasto.ModelLoadError, match=component):
        impasto.Engine.from_pretrained(str(dst))


@pytest.mark.parametrize("component, filename", [("unet", "config.json"), ("vae", "config.json"),
                                                 ("scheduler", "scheduler_config.json")])
def test_malformed_component(tiny_dir, tmp_path, component, filename):
    dst = _copy(tiny_dir, tmp_path)
    (dst / component / filename).write_text("{ not json")
    with pytest.raises(impasto.ModelLoadError, match=component):
        impasto.Engine.from_pretrained(str(dst))


def test_truncated_weights(tiny_dir, tmp_path):
    dst = _copy(tiny_dir, tmp_path)
    (w,) = [f for f in os.listdir(dst / "unet") if f.endswith(".safetensors")]
    data = (dst / "unet" / w).read_bytes()
    (dst / "unet" / w).write_bytes(data[: len(data) // 2])
    with pytest.raises(impasto.ModelLoadError, match="unet"):
        impasto.Engine.from_pretrained(str(dst))


def test_tiny_name_builds_random_model_and_says_so(tmp_path, monkeypatch):
    from impasto import tiny

    if os.path.isfile(os.path.join(tiny.SHIPPED_DIR, "model_index.json")):
        pytest.skip("trained tiny weights are shipped; the random fallback is not used")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="RANDOMLY INITIALIZED"):
        eng = impasto.Engine.from_pretrained("tiny")
    assert eng.base.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert eng.generate("a red star", steps=2, seed=0, output_type="np").images.shape == (1, 32, 32, 3)
