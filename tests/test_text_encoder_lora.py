"""Text-encoder LoRA, applied once per request and branch by the plan, equal to diffusers+PEFT
`load_lora_weights` (which loads the UNet and text-encoder parts of one file)."""

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model_state_dict

import impasto

STEPS = 4
TOL = 1e-3
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    """Two files written by save_lora_weights: text encoder + UNet (alpha in metadata), and
    text encoder only; and a kohya file of the text-encoder part."""
    d = tmp_path_factory.mktemp("te")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    torch.manual_seed(0)
    pipe.text_encoder.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=TE_TARGETS, init_lora_weights=False),
                                  adapter_name="t")
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False),
                          adapter_name="t")
    te_sd = get_peft_model_state_dict(pipe.text_encoder, adapter_name="t")
    StableDiffusionPipeline.save_lora_weights(
        str(d / "both"), unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="t"),
        text_encoder_lora_layers=te_sd, unet_lora_adapter_metadata=pipe.unet.peft_config["t"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["t"].to_dict())
    StableDiffusionPipeline.save_lora_weights(str(d / "te"), text_encoder_lora_layers=te_sd,
                                              text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["t"].to_dict())
    kohya = {}
    for key, value in te_sd.items():
        module, _, kind = key.rpartition(".lora_")
        stem = "lora_te_" + module.replace(".", "_")
        kohya[stem + (".lora_down.weight" if kind == "A.weight" else ".lora_up.weight")] = value.contiguous()
        kohya[stem + ".alpha"] = torch.tensor(16.0)
    safetensors.torch.save_file(kohya, str(d / "te_kohya.safetensors"))
    return {"both": str(d / "both" / "pytorch_lora_weights.safetensors"),
            "te": str(d / "te" / "pytorch_lora_weights.safetensors"), "kohya": str(d / "te_kohya.safetensors")}


def reference(tiny_dir, path, prompt, seed, weight=1.0):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if path:
        pipe.load_lora_weights(path, adapter_name="x")
        pipe.set_adapters(["x"], adapter_weights=[weight])
    return pipe(prompt, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_text_encoder_lora_equals_diffusers(tiny_dir, files):
    eng = impasto.Engine.from_pretrained(tiny_dir)
    eng.adapters.register("both", files["both"])
    eng.adapters.register("te", files["te"])
    eng.adapters.register("kohya", files["kohya"])
    reqs = [impasto.Request("a red star", adapters=["both"], seed=1, steps=STEPS, output_type="np"),
            impasto.Request("a red star", adapters=[("te", 0.7)], seed=1, steps=STEPS, output_type="np"),
            impasto.Request("a red star", adapters=["kohya"], seed=1, steps=STEPS, output_type="np"),
            impasto.Request("a red star", seed=1, steps=STEPS, output_type="np")]
    outs = eng.generate_batch(reqs)
    assert all(o.error is None for o in outs), [o.error for o in outs]
    assert _diff(outs[0].images, reference(tiny_dir, files["both"], "a red star", 1)) <= TOL
    te_ref = reference(tiny_dir, files["te"], "a red star", 1, weight=0.7)
    assert _diff(outs[1].images, te_ref) <= TOL
    te_full = reference(tiny_dir, files["te"], "a red star", 1)
    assert _diff(outs[2].images, te_full) <= TOL  # kohya = same weights
    base = reference(tiny_dir, None, "a red star", 1)
    assert _diff(outs[3].images, base) <= TOL
    assert _diff(te_full, base) > 100 * TOL  # the text-encoder LoRA moves the image
    for req, out in zip(reqs, outs):
        assert _diff(out.images, eng.generate_batch([req])[0].images) <= TOL
