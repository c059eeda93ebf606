"""The one file layer (engine/adapters/files.py): checks at every open."""

import os

import pytest
import safetensors.torch
import torch

import impasto
from impasto.adapters import files as file_layer
from impasto.adapters import kv as kv_format


def _kv_diffusers(folder, unet):
    """The layout diffusers' train_custom_diffusion.py saves: full fine-tuned W_k, W_v per attn2."""
    folder.mkdir()
    tensors = {}
    for name, (wk, wv) in kv_format.base_kv_weights(unet).items():
        tensors[f"{name}.processor.to_k_custom_diffusion.weight"] = wk + 0.1
        tensors[f"{name}.processor.to_v_custom_diffusion.weight"] = wv - 0.1
    safetensors.torch.save_file(tensors, str(folder / "pytorch_custom_diffusion_weights.safetensors"))
    safetensors.torch.save_file({"<new1>": torch.ones(unet.config.cross_attention_dim)}, str(folder / "<new1>.safetensors"))
    return str(folder)


# --- (d) the file layer ----------------------------------------------------------------------------


def test_a_symlink_out_of_the_root_inside_a_folder_is_refused(tiny_dir, tmp_path):
    """The registered folder is inside adapter_root, its token file links out: refused at the open."""
    root = tmp_path / "root"
    root.mkdir()
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(root))
    folder = _kv_diffusers(root / "cd", eng.base.unet)
    outside = tmp_path / "outside.safetensors"
    os.replace(os.path.join(folder, "<new1>.safetensors"), outside)
    os.symlink(outside, os.path.join(folder, "<new1>.safetensors"))
    with pytest.raises(impasto.AdapterPathError, match="outside adapter_root"):
        eng.adapters.register("cd", folder)
    kv_format.read_kv_header(folder, kv_format.base_kv_weights(eng.base.unet))  # unconfined, the reader follows it


def test_only_regular_files_are_opened(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)  # opening it would block forever
    for read in (file_layer.WeightsFile, file_layer.read_header, file_layer.read_safetensors, file_layer.load_weights_only):
        with pytest.raises(impasto.AdapterFormatError, match="not a regular file"):
            read(fifo)
    with pytest.raises(impasto.AdapterFormatError, match="no such file"):
        file_layer.WeightsFile(tmp_path / "missing.bin")
    assert file_layer.header_metadata(fifo) == {}
