"""The adapter store at scale: register_dir, budgets that hold under a request stream, busy adapters."""

import random

import numpy as np
import safetensors.torch
import torch

import impasto

Q = "down_blocks.{b}.attentions.0.transformer_blocks.0.attn{a}.to_{p}"


def lora(path, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    width = {0: 32, 1: 64}
    tensors = {}
    for b in (0, 1):
        for a in (1, 2):
            key = Q.format(b=b, a=a, p="q")
            tensors[f"unet.{key}.lora_A.weight"] = torch.randn(rank, width[b], generator=g)
            tensors[f"unet.{key}.lora_B.weight"] = torch.randn(width[b], rank, generator=g)
    safetensors.torch.save_file(tensors, str(path))
    return str(path)


def test_register_dir_reports_the_bad_ones(tiny_dir, tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    for i in range(5):
        lora(d / f"style-{i}.safetensors", i)
    (d / "broken.safetensors").write_bytes(b"\x00" * 5)
    lora(d / "bad name!.safetensors", 9)
    (d / "notes.txt").write_text("not an adapter")
    eng = impasto.Engine.from_pretrained(tiny_dir)
    errors = eng.adapters.register_dir(str(d))
    assert eng.adapters.names() == [f"style-{i}" for i in range(5)]
    assert set(errors) == {str(d / "broken.safetensors"), str(d / "bad name!.safetensors")}
    assert all(isinstance(e, impasto.AdapterError) for e in errors.values())


def test_stream_stays_within_host_budget(tiny_dir, tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    paths = [lora(d / f"a{i}.safetensors", i, rank=4 if i % 2 else 8) for i in range(24)]
    probe = impasto.Engine.from_pretrained(tiny_dir)
    per = {n: probe.adapters.register(n, p).nbytes for n, p in zip([f"a{i}" for i in range(24)], paths)}
    budget = 5 * max(per.values())
    eng = impasto.Engine.from_pretrained(tiny_dir, host_cache_bytes=budget, max_adapters_per_row=2)
    assert not eng.adapters.register_dir(str(d))
    rng = random.Random(0)
    peak = 0
    for batch in range(25):  # 200 requests, 8 per batch, adapters drawn Zipf-like
        reqs = []
        for i in range(8):
            k = min(int(rng.paretovariate(1.1)) - 1, 23)
            reqs.append(impasto.Request("a star", adapters=[f"a{k}"], steps=1, seed=i, height=16, width=16,
                                        output_type="latent", guidance=1.0))
        outs = eng.generate_batch(reqs)
        assert all(o.error is None for o in outs)
        resident = eng.adapters.resident_bytes()
        peak = max(peak, resident["host"])
        assert resident["host"] <= budget
    assert peak > 0
    # evicted adapters reload to the same result
    a = eng.generate("a star", adapters=["a23"], steps=2, seed=1, output_type="np").images
    b = probe.generate("a star", adapters=["a23"], steps=2, seed=1, output_type="np").images
    assert float(np.abs(a - b).max()) <= 1e-3


def test_unregister_of_a_busy_adapter_fails_clearly(tiny_dir, tmp_path):
    eng = impasto.Engine.from_pretrained(tiny_dir)
    eng.adapters.register("busy", lora(tmp_path / "busy.safetensors", 1))
    seen = []

    def during_step(module, args, output):
        try:
            eng.adapters.unregister("busy")
        except impasto.AdapterError as e:
            seen.append(e)

    h = eng.base.unet.register_forward_hook(during_step)
    try:
        out = eng.generate("a star", adapters=["busy"], steps=2, seed=0)
    finally:
        h.remove()
    assert out.images is not None and seen and "in use" in str(seen[0])
    eng.adapters.unregister("busy")  # free after the batch
    assert "busy" not in eng.adapters.names()


def test_waiting_request_adapters_prefetch_while_others_run(tiny_dir, tmp_path):
    """One slot: "later" waits for "first" to finish, and its file is read into the host cache
    while first's steps run (the prefetch thread starts at submit)."""
    eng = impasto.Engine.from_pretrained(tiny_dir, slots_per_bucket=1)
    eng.adapters.register("first", lora(tmp_path / "first.safetensors", 1))
    eng.adapters.register("later", lora(tmp_path / "later.safetensors", 2))
    seen = []
    h = eng.base.unet.register_forward_hook(lambda m, i, o: seen.append("later" in eng.adapters._host))
    try:
        outs = eng.generate_batch([
            impasto.Request("a", adapters=["first"], steps=12, seed=0, output_type="latent"),
            impasto.Request("b", adapters=["later"], steps=2, seed=0, output_type="latent"),  # waits for the slot
        ])
    finally:
        h.remove()
    assert all(o.error is None for o in outs)
    assert len(seen) == 14 and any(seen[:12])  # loaded while the first group's steps ran
