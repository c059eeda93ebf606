"""The command line: the options the API has, the A1111 PNG parameters, `impasto info`, and
every mistake reported in one line before any image is made."""

import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import impasto
from impasto.cli import build_parser, main

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_python_dash_m_and_version():
    r = subprocess.run([sys.executable, "-m", "impasto", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"impasto {impasto.__version__}"


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for default in ("(default: 30)", "(default: 7.5)", "(default: out.png)", "default: 0.8, 1.0 with --mask", "(default: a1111)"):
        assert default in text


@pytest.mark.parametrize("output,match", [
    ("nodir/x.png", "the folder .*nodir does not exist"),
    ("x", "expected an image file name"),
])
def test_bad_output_path_fails_before_generating(tiny_dir, tmp_path, capsys, monkeypatch, output, match):
    import re

    def never(*a, **k):
        raise AssertionError("the model was loaded for an output that cannot be written")

    monkeypatch.setattr(impasto.Engine, "from_pretrained", never)
    monkeypatch.chdir(tmp_path)
    rc, _, err = _run(capsys, "generate", "a star", "-o", output, "--model", tiny_dir)
    assert rc == 2 and re.search(match, err) and err.count("\n") == 1


@pytest.mark.parametrize("argv,match", [
    (["--seeds", "1,x"], "--seeds '1,x': expected integers"),
    (["--style", "nostyle"], "--style 'nostyle': expected NAME=VALUE"),
    (["--scheduler", "Euler b"], "unknown sampler 'Euler b'"),
    (["--init-image", "missing.png"], "--init-image missing.png: not a readable image"),
    (["--clip-skip", "9"], "clip_skip: 9 is more than"),
])
def test_option_mistakes_are_one_line(tiny_dir, tmp_path, capsys, argv, match):
    rc, _, err = _run(capsys, "generate", "a star", "-o", str(tmp_path / "x.png"), "--model", tiny_dir,
                      "--steps", "2", "-q", *argv)
    assert rc == 2 and match in err


def test_generate_options_and_info(tiny_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "img.png"
    rc, stdout, err = _run(capsys, "generate", "a (red:1.2) star", "-o", str(out), "--model", tiny_dir,
                           "--steps", "4", "--seeds", "3,4", "--scheduler", "Euler a", "--clip-skip", "2",
                           "--init-image", str(init), "--strength", "0.5", "--negative-prompt", "blurry, dark",
                           "-q", "--device", "cpu", "--dtype", "float32")
    assert rc == 0, err
    assert "Loading weights" not in err  # library chatter hidden without --verbose
    paths = [tmp_path / "img-0.png", tmp_path / "img-1.png"]
    assert all(p.exists() for p in paths) and "seed 3, 4" in stdout
    with impasto.Engine.from_pretrained(tiny_dir, device="cpu") as e:
        ref = e.generate("a (red:1.2) star", steps=4, seeds=[3, 4], num_images=2, scheduler="Euler a", clip_skip=2,
                         image=Image.open(init).convert("RGB"), strength=0.5, negative_prompt="blurry, dark",
                         prompt_syntax="a1111")
    for p, im in zip(paths, ref.images):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(im))
    rc, text, _ = _run(capsys, "info", str(paths[1]))
    assert rc == 0
    lines = text.strip().split("\n")
    assert lines[0] == "a (red:1.2) star" and lines[1] == "Negative prompt: blurry, dark"
    for part in ("Steps: 4", "Sampler: Euler a", "CFG scale: 7.5", "Seed: 4", "Size: 32x32", "Clip skip: 2",
                 "Denoising strength: 0.5"):
        assert part in lines[2]


def test_info_mistakes(tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    rc, _, err = _run(capsys, "info", str(plain))
    assert rc == 2 and "carries no A1111 'parameters' text" in err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    rc, _, err = _run(capsys, "info", str(junk))
    assert rc == 2 and "not a readable image" in err


def test_register_dir_and_lora_tag(tiny_dir, tmp_path, capsys):
    loras = tmp_path / "loras"
    loras.mkdir()
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({f"unet.{Q}.lora_A.weight": torch.randn(4, 32, generator=g),
                                 f"unet.{Q}.lora_B.weight": torch.randn(32, 4, generator=g)},
                                str(loras / "corgi.safetensors"))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", tiny_dir, "--steps", "2", "--seed", "1", "-q", "--register-dir", str(loras)]
    assert _run(capsys, "generate", "a dog <lora:corgi:0.5>", "-o", str(a), *common)[0] == 0
    assert _run(capsys, "generate", "a dog", "-o", str(b), "--adapter", "corgi=0.5", *common)[0] == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert "<lora:corgi:0.5>" in Image.open(b).info["parameters"]


def test_mask_inpaints_as_the_api_does(tiny_dir, tmp_path, capsys):
    init, mask, out = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(init)
    m = np.zeros((32, 32), dtype=np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).convert("RGB").save(mask)  # an RGB mask file is read as grayscale
    common = ["--model", tiny_dir, "--steps", "3", "--seed", "2", "-q"]
    rc, _, err = _run(capsys, "generate", "a red star", "-o", str(out), "--init-image", str(init), "--mask", str(mask),
                      *common)
    assert rc == 0, err
    with impasto.Engine.from_pretrained(tiny_dir, device="cpu") as e:
        ref = e.generate("a red star", steps=3, seed=2, image=Image.open(init).convert("RGB"),
                         mask_image=Image.fromarray(m), prompt_syntax="a1111").images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))
    assert "Denoising strength: 1.0" in Image.open(out).info["parameters"]  # inpainting's default strength
    rc, _, err = _run(capsys, "generate", "a red star", "-o", str(out), "--mask", str(mask), *common)
    assert rc == 2 and "--mask: inpainting needs --init-image" in err
    rc, _, err = _run(capsys, "generate", "a red star", "-o", str(out), "--init-image", str(init), "--mask",
                      str(tmp_path / "none.png"), *common)
    assert rc == 2 and "--mask" in err and "not a readable image" in err


def test_token_names_the_placeholder_of_a_registered_embedding(tiny_dir, tmp_path, capsys):
    """An A1111 embedding file names no token: --token gives it one, exactly as register(token=)."""
    emb = tmp_path / "pup.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))},
                                str(emb))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--model", tiny_dir, "--steps", "2", "--seed", "1", "-q", "--register", f"pup={emb}"]
    rc, _, err = _run(capsys, "generate", "a <pup> on grass", "-o", str(a), *common, "--token", "pup=<pup>")
    assert rc == 0, err
    with impasto.Engine.from_pretrained(tiny_dir, device="cpu") as e:
        e.adapters.register("pup", str(emb), token="<pup>")
        ref = e.generate("a <pup> on grass", steps=2, seed=1, prompt_syntax="a1111").images[0]
        plain = e.generate("a dog on grass", steps=2, seed=1, prompt_syntax="a1111").images[0]
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(ref))
    assert not np.array_equal(np.asarray(ref), np.asarray(plain))  # the embedding reached the prompt
    rc, _, err = _run(capsys, "generate", "a <pup> on grass", "-o", str(b), *common)  # no --token
    assert rc == 2 and "names no token; register it with token=" in err and err.count("\n") == 1
    rc, _, err = _run(capsys, "generate", "a <pup> on grass", "-o", str(b), *common, "--token", "pup")
    assert rc == 2 and "--token 'pup': expected NAME=VALUE" in err
