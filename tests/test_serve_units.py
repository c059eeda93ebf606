"""The pieces of `impasto serve` that need no server: the A1111 prompt parser, the PNG
`parameters` writer (shared with the CLI, tested through it too), API-key checks, binding."""

import io

import pytest
import safetensors.torch
import torch
from PIL import Image

from impasto.cli import main
from impasto.serve.a1111 import NotSupportedError, infotext, parse_prompt, png_bytes
from impasto.serve.auth import AuthError, ConfigError, Keys, check_binding, read_key_file

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("prompt, text, adapters", [
    ("a corgi <lora:corgi:0.8> on grass", "a corgi on grass", (("corgi", 0.8),)),
    ("<lora:a:1><lora:b:-0.5>a star", "a star", (("a", 1.0), ("b", -0.5))),
    ("a star <lora:plain>", "a star", (("plain", 1.0),)),
    ("a star <lyco:old:0.3>", "a star", (("old", 0.3),)),
    ("no tags here,  really", "no tags here, really", ()),
])
def test_lora_tags_are_taken_out_of_the_prompt(prompt, text, adapters):
    parsed = parse_prompt(prompt)
    assert (parsed.prompt, parsed.adapters) == (text, adapters)


@pytest.mark.parametrize("prompt, match", [
    ("x <lora:a:0.5:0.8>", "separate text-encoder"),
    ("x <lora:a:1:start=0.2>", "step-scheduled"),
    ("x <hypernet:h:1>", "networks are not supported"),
])
def test_lora_syntax_impasto_cannot_serve_yet_is_refused(prompt, match):
    with pytest.raises(NotSupportedError, match=match):
        parse_prompt(prompt)


def test_lora_multiplier_must_be_a_number():
    with pytest.raises(Exception, match="not a number"):
        parse_prompt("x <lora:a:lots>")


def test_infotext_is_a1111s_layout_and_round_trips_through_png():
    text = infotext(prompt="a red star", negative_prompt="blurry, dark", steps=20, sampler="DDIM", cfg_scale=7.5,
                    seed=42, width=32, height=32, model="tiny", adapters=[("corgi", 0.8)], styles={"wc": 4.0})
    assert text.splitlines() == [
        "a red star <lora:corgi:0.8>",
        "Negative prompt: blurry, dark",
        'Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 32x32, Model: tiny, Style guidance: "wc: 4"',
    ]
    # pasting the first line back into the server gives the same adapters
    assert parse_prompt(text.splitlines()[0]).adapters == (("corgi", 0.8),)
    png = png_bytes(Image.new("RGB", (4, 4), "red"), text)
    assert Image.open(io.BytesIO(png)).info["parameters"] == text


def test_cli_generate_reads_lora_tags_and_writes_parameters(tiny_dir, tmp_path):
    lora = tmp_path / "l0.safetensors"
    g = torch.Generator().manual_seed(0)
    safetensors.torch.save_file({f"unet.{Q}.lora_A.weight": torch.randn(4, 32, generator=g),
                                 f"unet.{Q}.lora_B.weight": torch.randn(32, 4, generator=g)}, str(lora))
    out = tmp_path / "star.png"
    assert main(["generate", "a red star <lora:l0:0.5>", "-o", str(out), "--model", tiny_dir, "--steps", "2",
                 "--seed", "3", "--register", f"l0={lora}", "-q"]) == 0
    params = Image.open(out).info["parameters"]
    assert params.splitlines()[0] == "a red star <lora:l0:0.5>"
    assert "Steps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 32x32" in params
    plain = tmp_path / "plain.png"
    assert main(["generate", "a red star", "-o", str(plain), "--model", tiny_dir, "--steps", "2", "--seed", "3",
                 "--register", f"l0={lora}", "--adapter", "l0=0.5", "-q"]) == 0
    assert Image.open(out).tobytes() == Image.open(plain).tobytes()  # the tag is the adapter


def test_keys_constant_time_compare_and_admin_rights(tmp_path):
    keys = Keys(["u" * 20], ["a" * 20])
    assert keys.caller("Bearer " + "u" * 20) != keys.caller("Bearer " + "a" * 20)  # admin keys are API keys
    for header in (None, "", "Bearer", "Bearer " + "u" * 19, "Basic " + "u" * 20, "Bearer " + "x" * 20):
        with pytest.raises(AuthError) as e:
            keys.caller(header)
        assert e.value.status == 401
    with pytest.raises(AuthError) as e:
        keys.admin("Bearer " + "u" * 20)
    assert e.value.status == 403
    assert keys.admin("Bearer " + "a" * 20)
    with pytest.raises(AuthError) as e:
        Keys(["u" * 20]).admin("Bearer " + "u" * 20)
    assert e.value.status == 403  # no admin key configured: adapter management is off
    f = tmp_path / "keys"
    f.write_text("# comment\n\nshort\n")
    with pytest.raises(ConfigError, match="shorter than 16"):
        read_key_file(f)
    f.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="no keys"):
        read_key_file(f)


def test_binding_beyond_loopback_needs_a_key(tmp_path, capsys):
    for host in ("127.0.0.1", "127.0.0.5", "::1", "localhost"):
        check_binding(host, None)
    check_binding("0.0.0.0", "keys.txt")
    rc = main(["serve", "--host", "0.0.0.0", "--adapters", str(tmp_path), "--port", "0"])
    assert rc == 2
    assert "refusing to serve beyond loopback without --api-key-file" in capsys.readouterr().err
