"""The server's A1111 endpoint (`POST /sdapi/v1/txt2img`) with per-request samplers and schedule
types, A1111 prompt weights, `<lora:NAME:W>` tags and clip skip, all through the engine's one
parser and scheduler table: every image equals `engine.generate` with the same parameters."""

import base64
import io
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from PIL import Image

import impasto
from impasto.serve.a1111 import NotSupportedError, sampler_for
from impasto.serve.app import create_app
from impasto.serve.backend import LocalBackend

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def client(engine, tmp_path_factory):
    """The app in-process over the session engine (no lifespan: the engine stays open)."""
    path = tmp_path_factory.mktemp("a1111") / "corgi.safetensors"
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({f"unet.{Q}.lora_A.weight": torch.randn(4, 32, generator=g),
                                 f"unet.{Q}.lora_B.weight": torch.randn(32, 4, generator=g)}, str(path))
    engine.adapters.register("a1111-corgi", str(path))
    yield TestClient(create_app(LocalBackend(engine)))
    engine.adapters.unregister("a1111-corgi")


def _images(r):
    assert r.status_code == 200, r.text
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in r.json()["images"]]


def test_txt2img_with_sampler_schedule_weights_tags_and_clip_skip(client, engine):
    body = {"prompt": ["a (red:1.3) star <lora:a1111-corgi:0.6>", "a [blue] square"], "batch_size": 2, "seed": 5,
            "steps": 4, "cfg_scale": 6, "sampler_name": "DPM++ 2M", "scheduler": "Karras",
            "override_settings": {"CLIP_stop_at_last_layers": 2}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    pngs, info = _images(r), json.loads(r.json()["info"])
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["all_seeds"] == [5, 6]
    wants = [engine.generate("a (red:1.3) star", adapters=[("a1111-corgi", 0.6)], steps=4, seed=5, guidance=6.0,
                             scheduler="DPM++ 2M Karras", clip_skip=2, prompt_syntax="a1111").images[0],
             engine.generate("a [blue] square", steps=4, seed=6, guidance=6.0, scheduler="DPM++ 2M Karras",
                             clip_skip=2, prompt_syntax="a1111").images[0]]
    for png, want in zip(pngs, wants):
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(want))
    text = pngs[0].info["parameters"]
    assert text.startswith("a (red:1.3) star <lora:a1111-corgi:0.6>\n")
    assert "Sampler: DPM++ 2M Karras" in text and "Clip skip: 2" in text
    # the weights are read (not text): the same prompt as plain text is another image
    plain = engine.generate("a (red:1.3) star", adapters=[("a1111-corgi", 0.6)], steps=4, seed=5, guidance=6.0,
                            scheduler="DPM++ 2M Karras", clip_skip=2, prompt_syntax="plain").images[0]
    assert not np.array_equal(np.asarray(pngs[0].convert("RGB")), np.asarray(plain))


def test_sampler_lists_and_default(client, engine):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert names[0] == "DDIM" and {"Euler a", "DPM++ 2M Karras", "UniPC", "LCM"} <= set(names)
    assert [s["label"] for s in client.get("/sdapi/v1/schedulers").json()] == ["Automatic", "Karras"]
    png, = _images(client.post("/sdapi/v1/txt2img", json={"prompt": "a star", "steps": 2, "seed": 1}))
    want = engine.generate("a star", steps=2, seed=1, guidance=7.0).images[0]  # A1111's default cfg_scale 7
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(want))
    assert "Sampler: DDIM" in png.info["parameters"]


@pytest.mark.parametrize("sampler,schedule,want", [
    ("euler a", None, "Euler a"), ("DPM++ 2M", "karras", "DPM++ 2M Karras"), ("DPM++ 2M Karras", "Automatic",
                                                                               "DPM++ 2M Karras"),
    ("EulerDiscreteScheduler", "Automatic", "EulerDiscreteScheduler"), (None, None, None), ("", "Automatic", None),
])
def test_sampler_and_schedule_names(sampler, schedule, want):
    assert sampler_for(sampler, schedule) == want


@pytest.mark.parametrize("body,status,match", [
    ({"sampler_name": "DPM fast"}, 422, "unknown sampler 'DPM fast'"),
    ({"sampler_name": "Euler", "scheduler": "Exponential"}, 422, "'Exponential' is not supported"),
    ({"sampler_name": "DDIM", "scheduler": "Karras"}, 422, "no Karras variant"),
    ({"scheduler": "Karras"}, 422, "needs a sampler_name"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, 422, "CLIP_stop_at_last_layers"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 9}}, 422, "clip_skip: 9 is more than"),
    ({"prompt": "a <lora:nobody:1>"}, 422, "unknown adapter 'nobody'"),
])
def test_mistakes_name_the_field(client, body, status, match):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a star", "steps": 2, **body})
    assert r.status_code == status and match in r.json()["error"]["message"], r.text
    with pytest.raises((impasto.RequestError, NotSupportedError)):
        sampler_for("DPM fast")
