"""Single-file SD 1.x checkpoints (the original A1111 / ComfyUI layout): the random fixture
converted to that layout loads back through diffusers' single-file loaders, offline, and equals
the folder; files of other kinds are named in the error."""

import os
import socket

import pytest
import safetensors.torch
import torch

import impasto


# ------------------------------------------------------------------ diffusers -> original layout
# An independent writer of the original layout (the inverse of diffusers' single-file conversion,
# after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py), for any number of
# blocks and layers per block, so the tiny fixture can be written as an A1111 checkpoint.
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _swap(rest: str, table: dict) -> str:
    for hf, sd in table.items():
        if rest.startswith(hf + "."):
            return sd + rest[len(hf):]
    return rest


def unet_to_original(sd: dict, config) -> dict:
    L = config.layers_per_block
    up_attn = {i: "CrossAttn" in t for i, t in enumerate(config.up_block_types)}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        head, rest = None, None
        if ".".join(p[:2]) in fixed:
            head, rest = fixed[".".join(p[:2])], ".".join(p[2:])
        elif p[0] == "conv_in" or p[0] in ("conv_norm_out", "conv_out"):
            head, rest = fixed[p[0]], ".".join(p[1:])
        elif p[0] in ("down_blocks", "up_blocks"):
            i, part = int(p[1]), p[2]
            if part in ("resnets", "attentions"):
                j = int(p[3])
                n = 1 + i * (L + 1) + j if p[0] == "down_blocks" else i * (L + 1) + j
                block = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
                head = f"{block}.{n}.{0 if part == 'resnets' else 1}"
                rest = ".".join(p[4:])
                rest = _swap(rest, RESNET) if part == "resnets" else rest
            elif part == "downsamplers":
                head, rest = f"input_blocks.{(i + 1) * (L + 1)}.0.op", ".".join(p[5:])
            else:  # upsamplers.0.conv
                head, rest = f"output_blocks.{i * (L + 1) + L}.{2 if up_attn[i] else 1}", ".".join(p[4:])
        elif p[0] == "mid_block":
            j = int(p[2])
            head = f"middle_block.{2 * j}" if p[1] == "resnets" else "middle_block.1"
            rest = _swap(".".join(p[3:]), RESNET) if p[1] == "resnets" else ".".join(p[3:])
        out[f"model.diffusion_model.{head}.{rest}"] = v
    return out


def vae_to_original(sd: dict, config) -> dict:
    N = len(config.block_out_channels)
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        coder, name = p[0], k
        if coder in ("encoder", "decoder"):
            if p[1] == "conv_norm_out":
                name = f"{coder}.norm_out." + ".".join(p[2:])
            elif p[1] in ("down_blocks", "up_blocks"):
                i = int(p[2]) if coder == "encoder" else N - 1 - int(p[2])
                level = f"{coder}.{'down' if coder == 'encoder' else 'up'}.{i}"
                if p[3] == "resnets":
                    name = f"{level}.block.{p[4]}." + _swap(".".join(p[5:]), {"conv_shortcut": "nin_shortcut"})
                else:  # downsamplers / upsamplers .0.conv
                    name = f"{level}.{'downsample' if p[3] == 'downsamplers' else 'upsample'}." + ".".join(p[5:])
            elif p[1] == "mid_block":
                if p[2] == "resnets":
                    name = f"{coder}.mid.block_{int(p[3]) + 1}." + _swap(".".join(p[4:]), {"conv_shortcut": "nin_shortcut"})
                else:
                    name = f"{coder}.mid.attn_1." + _swap(".".join(p[4:]), VAE_ATTN)
                    if v.dim() == 2:  # the original attention projections are 1x1 convolutions
                        v = v[:, :, None, None]
        out["first_stage_model." + name] = v
    return out


def to_original(folder) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    sd = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    # the original names are transformers 4's (text_model.*); transformers 5 drops that prefix
    sd.update({"cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k: v
               for k, v in te.state_dict().items()})
    return {k: v.contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def original(tiny_dir):
    return to_original(tiny_dir)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the single-file loaders must stay offline."""
    def refuse(*a, **k):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_original_checkpoint_loads_back_equal_to_the_folder(tiny_dir, original, tmp_path, no_network):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(original, str(path))
    ckpt = tmp_path / "tiny.ckpt"  # A1111's pickled layout: {"state_dict": ..., "global_step": ...}
    torch.save({"state_dict": original, "global_step": 7}, str(ckpt))
    with impasto.Engine.from_pretrained(tiny_dir, device="cpu") as folder:
        want = {c: _state(getattr(folder.base, c)) for c in ("unet", "vae", "text_encoder")}
        ref = folder.generate("a red star", steps=3, seed=1, output_type="np").images
    for p in (path, ckpt):
        with impasto.Engine.from_pretrained(str(p), config=tiny_dir, device="cpu") as e:
            for c, sd in want.items():
                got = getattr(e.base, c).state_dict()
                assert set(got) == set(sd), c
                assert all(torch.equal(got[k], sd[k]) for k in sd), c
            assert type(e.base.scheduler).__name__ == "DDIMScheduler"  # the config folder's scheduler
            assert e.base.tokenizer("a red star").input_ids == [49406, 320, 736, 1565, 49407]  # CLIP's ids
            out = e.generate("a red star", steps=3, seed=1, output_type="np").images
        assert float(abs(out - ref).max()) == 0.0


def test_inpainting_checkpoint_gets_its_input_channels_from_the_file(tiny_dir, original, tmp_path):
    """The config says in_channels 4; a 9-channel conv_in makes an inpainting UNet (SD's layout)."""
    sd = dict(original)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, torch.randn(w.shape[0], 5, *w.shape[2:])], 1)
    path = tmp_path / "inpaint.safetensors"
    safetensors.torch.save_file(sd, str(path))
    with impasto.Engine.from_pretrained(str(path), config=tiny_dir, device="cpu") as e:
        assert e.base.inpainting and e.base.unet.config.in_channels == 9


def test_shipped_configs_are_sd15s():
    """The shipped configs build SD 1.5's components: their published parameter counts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from impasto.loading import SD1_CONFIG

    def count(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD1_CONFIG, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD1_CONFIG, subfolder="vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(SD1_CONFIG, "text_encoder")))
    assert (count(unet), count(vae), count(te)) == (859_520_964, 83_653_863, 123_060_480)


def _file(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: torch.zeros(1) for k in tensors}, str(path))
    return str(path)


@pytest.mark.parametrize("keys,match", [
    (["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.0.weight"], "SDXL is not supported"),
    (["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.0.weight"], "an SD 2.x single-file"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "a LoRA adapter file"),
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "the weights of one diffusers component"),
    (["model.diffusion_model.out.0.weight"], "without its VAE .* and text encoder"),
    (["foo.bar"], r"not a Stable Diffusion checkpoint \(top-level names \['foo'\]\)"),
])
def test_other_files_are_named(tmp_path, keys, match):
    with pytest.raises(impasto.ModelLoadError, match=match):
        impasto.Engine.from_pretrained(_file(tmp_path, keys), device="cpu")


def test_unreadable_and_mismatched_files(tiny_dir, original, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"x")
    with pytest.raises(impasto.ModelLoadError, match="junk.safetensors: not a readable checkpoint"):
        impasto.Engine.from_pretrained(str(junk), device="cpu")

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Boom()}, str(evil))
    with pytest.raises(impasto.ModelLoadError, match="refused, nothing executed"):
        impasto.Engine.from_pretrained(str(evil), device="cpu")
    path = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(original, str(path))
    # the tiny checkpoint against SD 1.5's shipped configs: the shapes do not fit
    with pytest.raises(impasto.ModelLoadError, match="component 'unet' could not be converted with the configs of"):
        impasto.Engine.from_pretrained(str(path), device="cpu")
    with pytest.raises(impasto.ModelLoadError, match="is not a folder of diffusers configs"):
        impasto.Engine.from_pretrained(str(path), config=str(tmp_path / "nowhere"), device="cpu")
    with pytest.raises(impasto.ModelLoadError, match="is for single-file checkpoints"):
        impasto.Engine.from_pretrained(tiny_dir, config=tiny_dir, device="cpu")


def test_cli_generates_from_a_single_file(tiny_dir, original, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from impasto.cli import main

    path = tmp_path / "my-model.safetensors"
    safetensors.torch.save_file(original, str(path))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--steps", "2", "--seed", "3", "-q"]
    assert main(["generate", "a red star", "-o", str(a), "--model", str(path), "--config", tiny_dir, *common]) == 0
    assert main(["generate", "a red star", "-o", str(b), "--model", tiny_dir, *common]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert "Model: my-model" in Image.open(a).info["parameters"]  # A1111 names a checkpoint by its stem
    capsys.readouterr()
