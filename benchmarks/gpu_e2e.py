"""End-to-end on CUDA (benchmarks/gpu_check.sh): a mixed adapter batch through the engine with
`compile=True`, against the same batch through the eager engine, and the eager engine on the
native backend against its default (Triton on CUDA).

A tiny random SD-layout model (fixed seed) and rank-4/8/16 PEFT LoRAs written by diffusers;
requests mix one adapter, two adapters, a weighted adapter and none, with CFG, in one batch.

    python3 benchmarks/gpu_e2e.py --json e2e.json
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
RANKS = {"r4": 4, "r8": 8, "r16": 16}


def _write_lora(tiny_dir, folder, rank, seed):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=ATTN, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def _requests(steps):
    import impasto

    mix = [["r4"], ["r8", "r16"], [], [("r16", 0.5)]]
    return [impasto.Request("a red star on a blue background", adapters=a, seed=3 + i, steps=steps, output_type="latent")
            for i, a in enumerate(mix)]


def _latents(outs):
    errors = [str(o.error) for o in outs if o.error is not None]
    if errors:
        raise RuntimeError("; ".join(errors))
    return np.stack([np.asarray(o.images) for o in outs])


def run(device: str, steps: int) -> dict:
    import impasto
    from impasto.kernels import use_backend
    from impasto.tiny import build_random_model

    result = {"device": device, "torch": torch.__version__, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = build_random_model(os.path.join(tmp, "model"), seed=0)
        files = {n: _write_lora(tiny_dir, os.path.join(tmp, n), r, seed=10 + r) for n, r in RANKS.items()}

        def engine(**kw):
            eng = impasto.Engine.from_pretrained(tiny_dir, device=device, max_rank=16, slots_per_bucket=4, **kw)
            for name, path in files.items():
                eng.adapters.register(name, path)
            return eng

        eager = engine()
        t0 = time.perf_counter()
        want = _latents(eager.generate_batch(_requests(steps)))
        result["eager_s"] = time.perf_counter() - t0
        with use_backend("native"):
            got = _latents(eager.generate_batch(_requests(steps)))
        result["native_vs_default_max_abs"] = float(np.abs(got - want).max())

        compiled = engine(compile=True)
        t0 = time.perf_counter()
        first = _latents(compiled.generate_batch(_requests(steps)))
        result["compiled_first_s"] = time.perf_counter() - t0  # includes compilation
        t0 = time.perf_counter()
        again = _latents(compiled.generate_batch(_requests(steps)))
        result["compiled_again_s"] = time.perf_counter() - t0
        result["compiled_vs_eager_max_abs"] = float(np.abs(first - want).max())
        result["compiled_repeat_max_abs"] = float(np.abs(again - first).max())
        result["latent_max_abs"] = float(np.abs(want).max())
    tol = 1e-3 * max(1.0, result["latent_max_abs"])
    result["tolerance"] = tol
    result["ok"] = result["compiled_vs_eager_max_abs"] <= tol and result["native_vs_default_max_abs"] <= tol
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    result = run(args.device, args.steps)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    raise SystemExit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
