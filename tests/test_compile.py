"""Compile mode and the device pool budget: a torch.compile'd UNet serves adapters of different
ranks, swapped in and out of fixed slots, without a recompile, and equals the eager engine."""

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict

import impasto
from impasto.adapters.lora import attention_targets, lora_targets, runtime_buckets, slots_for_budget
from impasto.errors import AdapterShapeError

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
RANKS = {"r2": 2, "r4": 4, "r8": 8, "r16": 16}
STEPS = 2


def _write_lora(tiny_dir, folder, rank, seed, targets=ATTN):
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False))
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=sd)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def lora_files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile_loras")
    return {name: _write_lora(tiny_dir, str(root / name), r, seed=10 + r) for name, r in RANKS.items()}


def _engine(tiny_dir, files, **kw):
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", max_rank=16, slots_per_bucket=2, **kw)
    for name, path in files.items():
        eng.adapters.register(name, path)
    return eng


# Each batch: two requests (4 rows with CFG), same shapes; adapters of every rank rotate through
# 2 slots, so later batches evict and overwrite slots the compiled graph already read. Each batch
# names at most 2 distinct adapters: more would split it into chunks of other shapes.
BATCHES = [
    [("r2", None), (None, None)],
    [("r4", None), ("r8", None)],
    [("r16", None), ("r2", "r16")],
    [(None, None), ("r8", "r4")],
    [("r16", "r2"), ("r2", None)],
]


def _requests(batch):
    reqs = []
    for i, names in enumerate(batch):
        adapters = [n for n in names if n]
        reqs.append(impasto.Request("a red star on a blue background", adapters=adapters, seed=3 + i, steps=STEPS,
                                    output_type="latent"))
    return reqs


def test_compiled_unet_swaps_ranks_without_recompile(tiny_dir, lora_files):
    compiles = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs Dynamo hands over
        compiles.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from functorch.compile import make_boxed_func

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    torch._dynamo.reset()
    compiled = _engine(tiny_dir, lora_files, compile=backend)
    eager = _engine(tiny_dir, lora_files)
    assert compiled.lora.fixed and compiled.lora.buckets == (16,), "compile mode uses the fixed pools"

    first = compiled.generate_batch(_requests(BATCHES[0]))
    assert all(o.error is None for o in first)
    n_graphs = len(compiles)
    assert n_graphs > 0, "the UNet forward was not compiled"
    outputs = [first]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in BATCHES[1:]:
            outs = compiled.generate_batch(_requests(batch))
            assert all(o.error is None for o in outs), [o.error for o in outs]
            outputs.append(outs)
    assert len(compiles) == n_graphs, "a later batch compiled a new graph"
    pools = {id(t) for p in compiled.lora.pools.values() for pair in p.values() for t in pair}
    assert len(pools) == 2 * len(attention_targets(compiled.base.unet)), "pools must be allocated once, up front"

    for batch, outs in zip(BATCHES, outputs):
        ref = eager.generate_batch(_requests(batch))
        for o, r in zip(outs, ref):
            torch.testing.assert_close(o.images, r.images, rtol=1e-4, atol=1e-4)
    # the adapters did something: a LoRA row differs from the plain row of the same seed
    plain = eager.generate_batch([impasto.Request("a red star on a blue background", seed=3, steps=STEPS,
                                                  output_type="latent")])[0].images
    assert (outputs[0][0].images - plain).abs().max() > 1e-3


def test_compile_mode_refuses_a_lora_outside_its_fixed_pools(tiny_dir, tmp_path):
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", compile="aot_eager", max_rank=16)
    path = _write_lora(tiny_dir, str(tmp_path / "ff"), 4, seed=1, targets=["ff.net.2"])
    with pytest.raises(AdapterShapeError, match=r"pytorch_lora_weights.*ff\.net\.2.*fixed LoRA pools"):
        eng.adapters.register("ff", path)
    with pytest.raises(Exception, match="above max_rank=16"):
        eng.adapters.register("big", _write_lora(tiny_dir, str(tmp_path / "big"), 32, seed=2))


@pytest.mark.parametrize("compile_mode", [False, "aot_eager"])
def test_device_pool_budget_sets_the_slots_and_is_never_exceeded(tiny_dir, lora_files, compile_mode):
    probe = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    unet_t = attention_targets(probe.base.unet) if compile_mode else lora_targets(probe.base.unet)
    te_t = lora_targets(probe.base.text_encoder)
    buckets = (16,) if compile_mode else runtime_buckets(16, fixed=False)
    one_slot = sum(k + n for t in (unet_t, te_t) for k, n in t.values()) * sum(buckets) * 4
    budget = 2 * one_slot + one_slot // 2  # room for 2 slots per bucket, not 3
    assert slots_for_budget(budget, [unet_t, te_t], buckets, torch.float32) == 2

    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", max_rank=16, device_pool_bytes=budget,
                                         compile=compile_mode, slots_per_bucket=64)
    assert eng.lora.S == eng.te_lora.S == 2
    for name, path in lora_files.items():
        eng.adapters.register(name, path)
    for batch in BATCHES:
        outs = eng.generate_batch(_requests(batch))
        assert all(o.error is None for o in outs)
        assert 0 < eng.adapters.resident_bytes()["device"] <= budget

    with pytest.raises(ValueError, match=r"device_pool_bytes=100 holds no LoRA slot.*takes \d+ bytes"):
        impasto.Engine.from_pretrained(tiny_dir, device="cpu", max_rank=16, device_pool_bytes=100)
