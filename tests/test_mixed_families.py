"""One batch mixing `lora`, `kv`, `rank1` adapters and none, in any combination per request:
each request equals itself run alone."""

import numpy as np
import torch
from peft import LoraConfig, get_peft_model_state_dict
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import impasto
from test_kv_serving import custom_diffusion
from test_rank1_serving import CAPTIONS, _concept

STEPS = 3


def test_every_family_in_one_batch(tiny_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root))
    eng.adapters.compute_covariance(eng.base.tokenizer, eng.base.text_encoder, CAPTIONS)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False), adapter_name="l")
    StableDiffusionPipeline.save_lora_weights(str(root / "l"), unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="l"))
    eng.adapters.register("lora", str(root / "l" / "pytorch_lora_weights.safetensors"))
    custom_diffusion(tiny_dir, str(root / "cd"), seed=3)
    eng.adapters.register("cd", str(root / "cd"), token="<cd>")
    eng.adapters.register("perf", _concept(eng, 4, "<p>", "teddy", root))
    reqs = [
        impasto.Request("a <cd> and a <p>", adapters=["lora", ("cd", 0.7), "perf"], seed=1),
        impasto.Request("a <p> on grass", adapters=["perf"], seed=2),
        impasto.Request("a <cd>", adapters=["cd", ("lora", 0.5)], seed=3),
        impasto.Request("a plain red star", seed=4),
        impasto.Request("a <p>", adapters=[impasto.Adapter("perf", beta=0.5, global_lock=True), "lora"], seed=5),
    ]
    reqs = [impasto.Request(r.prompt, adapters=r.adapters, seed=r.seed, steps=STEPS, output_type="np") for r in reqs]
    outs = eng.generate_batch(reqs)
    for req, out in zip(reqs, outs):
        assert out.error is None, out.error
        solo = eng.generate_batch([req])[0]
        assert float(np.abs(out.images - solo.images).max()) <= 1e-3
    assert float(np.abs(outs[1].images - outs[4].images).max()) > 1e-2
