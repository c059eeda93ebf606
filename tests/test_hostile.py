"""Hostile adapter files (issue 13): no hang, no memory bomb, no escape from adapter_root, no
stale weights, true host accounting. Each test builds the hostile file a user could hand in."""

import json
import os
import struct
import threading
import time
import weakref

import numpy as np
import pytest
import safetensors.torch
import torch

import impasto
from impasto.adapters import files
from impasto.adapters.families import FAMILIES
from impasto.adapters.kv import KvFile, KvLayer, write_kv

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
Q2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
QV = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"


def lora_file(path, *, rank=4, width=32, dtype=torch.float32, keys=(Q,), metadata=None, seed=0, prefix="unet."):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in keys:
        tensors[f"{prefix}{key}.lora_A.weight"] = torch.randn(rank, width, generator=g).to(dtype)
        tensors[f"{prefix}{key}.lora_B.weight"] = torch.randn(width, rank, generator=g).to(dtype)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return str(path)


def raw_safetensors(path, header, data=b""):
    """A file with this exact JSON header text (bytes or str) and data."""
    header = header.encode() if isinstance(header, str) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def kv_base(eng):
    return {n: (a.to_k.weight.detach(), a.to_v.weight.detach())
            for n, a in eng.base.unet.named_modules() if n.endswith("attn2")}


def kv_file(path, eng, *, rank=2, token="<a>", seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (wk, wv) in kv_base(eng).items():
        h, d = wk.shape
        layers[name] = KvLayer(k_factors=(0.05 * torch.randn(h, rank, generator=g), torch.randn(rank, d, generator=g)),
                               v_factors=(0.05 * torch.randn(h, rank, generator=g), torch.randn(rank, d, generator=g)))
    d = next(iter(kv_base(eng).values()))[0].shape[1]
    write_kv(path, KvFile(path=str(path), format="kv", layers=layers, tokens={token: torch.randn(d, generator=g)}))
    return str(path)


def compressed_pickle(path, eng, *, u=None, v=None, embed=None):
    """The original repo's compressed delta (nested pickle); `u(h, d)`, `v(r, d)` make each layer's factors."""
    g = torch.Generator().manual_seed(0)
    top = {}
    for name, (wk, _) in kv_base(eng).items():
        h, d = wk.shape
        for proj in ("to_k", "to_v"):
            uu = u(h, d) if u else torch.randn(h, 2, generator=g)
            vv = v(uu.shape[1], d) if v else torch.randn(uu.shape[1], d, generator=g)
            top[f"{name}.{proj}.weight"] = {"u": uu, "v": vv}
    obj = {"unet": top, "modifier_token": {"<a>": embed if embed is not None else torch.randn(32, generator=g)}}
    torch.save(obj, path)
    return str(path)


def request(adapters=(), prompt="a red star", **kw):
    kw = {"seed": 1, "steps": 1, "height": 16, "width": 16, "output_type": "np", "guidance": 1.0, **kw}
    return impasto.Request(prompt, adapters=list(adapters), **kw)


@pytest.fixture(scope="module")
def shared(tiny_dir, tmp_path_factory):
    """One engine for the tests that need no special limits (building one costs seconds)."""
    top = tmp_path_factory.mktemp("hostile")
    return impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(top), max_rank=8), top


@pytest.fixture
def root(shared, tmp_path):
    """A fresh folder inside the shared engine's adapter_root; the test's adapters are
    unregistered after it."""
    eng, top = shared
    r = top / tmp_path.name
    r.mkdir()
    yield r
    for name in eng.adapters.names():
        eng.adapters.unregister(name)


@pytest.fixture
def eng(shared, root):
    return shared[0]


def in_thread(fn, timeout=20):
    """fn() run in a thread: its exception or result; fails (never hangs) past `timeout`."""
    box = {}

    def run():
        try:
            box["ok"] = fn()
        except BaseException as e:  # noqa: BLE001  (the test inspects it)
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for {timeout} s"
    return box.get("err", box.get("ok"))


# ---------------------------------------------------------------------------------------------
# Hangs and escapes.
# ---------------------------------------------------------------------------------------------


def _unblock(path):
    """Release a reader blocked on the FIFO at `path` (so a failing test does not leave a thread)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_fifo_is_refused_at_once_everywhere(eng, root):
    fifo = str(root / "pipe.safetensors")
    os.mkfifo(fifo)
    peft = root / "peft"
    peft.mkdir()
    lora_file(peft / "adapter_model.safetensors", prefix="base_model.model.")
    os.mkfifo(peft / "adapter_config.json")
    try:
        for path in (fifo, str(peft)):
            err = in_thread(lambda: eng.adapters.register("p", path))
            assert isinstance(err, impasto.AdapterFormatError), err
            assert "not a regular file" in str(err)
        lora_file(root / "z-good.safetensors")
        errors = in_thread(lambda: eng.adapters.register_dir(str(root)))
        assert set(errors) == {fifo, str(peft)} and "z-good" in eng.adapters.names()
        # a registered file swapped for a FIFO: the load fails at once, as the request's error
        os.replace(lora_file(root / "tmp.safetensors"), root / "later.safetensors")
        eng.adapters.register("later", str(root / "later.safetensors"))
        os.unlink(root / "later.safetensors")
        os.mkfifo(root / "later.safetensors")
        out = in_thread(lambda: eng.generate_batch([request(["later"])])[0])
        assert isinstance(out.error, impasto.AdapterError), out.error
    finally:
        for p in (fifo, str(peft / "adapter_config.json"), str(root / "later.safetensors")):
            _unblock(p)


def test_every_open_uses_nofollow_nonblock_and_fstat(root, monkeypatch):
    p = lora_file(root / "a.safetensors")
    flags, fstats = [], []
    real_open, real_fstat = os.open, os.fstat
    monkeypatch.setattr(os, "open", lambda path, fl, *a: (flags.append((path, fl)), real_open(path, fl, *a))[1])
    monkeypatch.setattr(os, "fstat", lambda fd: (fstats.append(fd), real_fstat(fd))[1])
    with files.confined(os.path.realpath(root)):
        files.read_header(p)
    assert flags and all(fl & os.O_NOFOLLOW and fl & os.O_NONBLOCK for _, fl in flags)
    assert fstats


def _escape_cases(root, outside):
    """Folders inside the root whose weights, config or token file link outside it."""
    lora_file(outside / "adapter_model.safetensors", prefix="base_model.model.")
    (outside / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    weights = root / "weights-link"
    weights.mkdir()
    (weights / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4}))
    os.symlink(outside / "adapter_model.safetensors", weights / "adapter_model.safetensors")
    config = root / "config-link"
    config.mkdir()
    lora_file(config / "adapter_model.safetensors", prefix="base_model.model.")
    os.symlink(outside / "adapter_config.json", config / "adapter_config.json")
    return [weights, config]


def test_symlinks_inside_folders_cannot_leave_the_root(eng, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    folders = _escape_cases(root, outside)
    # a kv diffusers folder whose token file links outside
    kv = root / "kv-token-link"
    kv.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (wk, wv) in kv_base(eng).items():
        tensors[f"{name}.processor.to_k_custom_diffusion.weight"] = wk + 0.01 * torch.randn(wk.shape, generator=g)
        tensors[f"{name}.processor.to_v_custom_diffusion.weight"] = wv + 0.01 * torch.randn(wv.shape, generator=g)
    safetensors.torch.save_file(tensors, str(kv / "pytorch_custom_diffusion_weights.safetensors"))
    safetensors.torch.save_file({"<a>": torch.randn(32)}, str(outside / "a.safetensors"))
    os.symlink(outside / "a.safetensors", kv / "a.safetensors")
    for folder in folders + [kv]:
        with pytest.raises(impasto.AdapterPathError, match="outside adapter_root"):
            eng.adapters.register("x", str(folder))
    assert eng.adapters.names() == []


def test_file_swapped_for_a_link_after_registration_is_not_read(eng, root, tmp_path):
    p = lora_file(root / "a.safetensors")
    eng.adapters.register("a", p)
    lora_file(root / "b.safetensors", seed=3)
    eng.adapters.register("b", str(root / "b.safetensors"))
    outside = lora_file(tmp_path / "outside.safetensors", seed=5)
    os.unlink(p)
    os.symlink(outside, p)
    out_a, out_b = eng.generate_batch([request(["a"]), request(["b"])])
    assert isinstance(out_a.error, impasto.AdapterPathError) and "outside adapter_root" in str(out_a.error)
    assert out_b.error is None


# ---------------------------------------------------------------------------------------------
# Memory bombs.
# ---------------------------------------------------------------------------------------------


def test_stride0_kv_pickle_is_refused_before_materializing(eng, root):
    p = compressed_pickle(root / "compressed_delta.bin", eng, u=lambda h, d: torch.zeros(h, 1).expand(h, 10**7),
                          v=lambda r, d: torch.zeros(1, d).expand(r, d))
    assert os.path.getsize(p) < 200_000
    t = time.perf_counter()
    with pytest.raises(impasto.AdapterFormatError, match="stride-0"):
        eng.adapters.register("bomb", p)
    assert time.perf_counter() - t < 5


def test_kv_factor_rank_is_bounded_by_the_layer(eng, root):
    p = compressed_pickle(root / "compressed_delta.bin", eng, u=lambda h, d: torch.randn(h, min(h, d) + 1))
    with pytest.raises(impasto.AdapterShapeError, match=r"min\(h, D\)"):
        eng.adapters.register("wide", p)
    # ranks above max_rank but within min(h, D) are real files (compressed SD 1.5 reaches ~76)
    ok = compressed_pickle(root / "compressed_delta_ok.bin", eng, u=lambda h, d: torch.randn(h, min(h, d)))
    assert eng.adapters.register("ok", ok).rank > eng.adapters.max_rank


def test_stride0_compvis_embed_and_token_count_are_bounded(eng, root):
    good = compressed_pickle(root / "x.bin", eng)
    st = torch.load(good, weights_only=True)
    ckpt = {"state_dict": {k: v for k, v in st["unet"].items()}}
    ckpt["state_dict"]["embed"] = torch.zeros(1, 32).expand(10**6, 32)
    torch.save(ckpt, root / "delta.ckpt")
    with pytest.raises(impasto.AdapterFormatError, match="stride-0"):
        eng.adapters.register("bomb", str(root / "delta.ckpt"))
    ckpt["state_dict"]["embed"] = torch.randn(files.MAX_TOKENS + 1, 32)
    torch.save(ckpt, root / "delta.ckpt")
    with pytest.raises(impasto.AdapterShapeError, match="at most 16 tokens"):
        eng.adapters.register("many", str(root / "delta.ckpt"))
    ckpt["state_dict"]["embed"] = torch.randn(files.MAX_TOKENS, 32)
    torch.save(ckpt, root / "delta.ckpt")
    assert len(eng.adapters.register("sixteen", str(root / "delta.ckpt")).token_map) == 16


def test_pickle_declaring_more_than_the_file_holds(root):
    base = torch.randn(1000)
    torch.save({"a": base, **{f"v{i}": base for i in range(50)}}, root / "shared.bin")
    with pytest.raises(impasto.AdapterFormatError, match="more than the file"):
        files.load_weights_only(str(root / "shared.bin"))


def test_host_budget_is_made_before_a_load(eng, root, monkeypatch):
    paths = [lora_file(root / f"a{i}.safetensors", seed=i) for i in range(3)]
    per = [eng.adapters.register(f"a{i}", p).nbytes for i, p in enumerate(paths)][0]
    monkeypatch.setattr(eng.adapters, "host_cache_bytes", int(1.5 * per))
    seen = []
    family = FAMILIES["lora"]
    real = type(family).load
    monkeypatch.setattr(type(family), "load", lambda self, store, info: (
        seen.append(store.resident_bytes()["host"] + info.nbytes), real(self, store, info))[1])
    for i in range(3):
        eng.adapters.load(f"a{i}")
    assert max(seen) <= eng.adapters.host_cache_bytes


# ---------------------------------------------------------------------------------------------
# Malformed headers and values.
# ---------------------------------------------------------------------------------------------


def _deep(n):
    return "[" * n + "]" * n


MALFORMED = {
    "header is a JSON array": "[1, 2, 3]",
    "header is a JSON string": '"hello"',
    "metadata is not an object": '{"__metadata__": [1, 2]}',
    "metadata value not a string": '{"__metadata__": {"impasto.family": 3}}',
    "metadata key family null": '{"__metadata__": {"impasto.family": null}}',
    "nested 200000 deep": '{"__metadata__": {}, "x": ' + _deep(200_000) + "}",
    "nested metadata 200000 deep": '{"__metadata__": ' + _deep(200_000) + "}",
    "entry is a list": '{"x": [1]}',
    "shape of strings": '{"x": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}',
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_is_a_format_error(eng, root, case):
    p = raw_safetensors(root / "m.safetensors", MALFORMED[case], b"\0" * 4)
    with pytest.raises(impasto.AdapterFormatError) as e:
        eng.adapters.register("m", p)
    assert "m.safetensors" in str(e.value)


def test_register_dir_never_raises_for_one_file(eng, root):
    for i, case in enumerate(MALFORMED):
        raw_safetensors(root / f"bad{i}.safetensors", MALFORMED[case], b"\0" * 4)
    for i in range(3):
        lora_file(root / f"z{i}.safetensors", seed=i)
    errors = eng.adapters.register_dir(str(root))
    assert eng.adapters.names() == ["z0", "z1", "z2"]
    assert set(errors) == {str(root / f"bad{i}.safetensors") for i in range(len(MALFORMED))}
    assert all(isinstance(e, impasto.AdapterFormatError) for e in errors.values())


def _peft_folder(root, config):
    d = root / "peft"
    d.mkdir(exist_ok=True)
    lora_file(d / "adapter_model.safetensors", prefix="base_model.model.")
    (d / "adapter_config.json").write_text(json.dumps(config))
    return str(d)


ALPHAS = {
    "metadata NaN": lambda root: lora_file(root / "a.safetensors", metadata={
        "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": float("nan")})}),
    "metadata 1e39": lambda root: lora_file(root / "a.safetensors", metadata={
        "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 1e39})}),
    "metadata alpha_pattern 1e6": lambda root: lora_file(root / "a.safetensors", metadata={
        "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {"to_q": 1e6}})}),
    "adapter_config.json NaN": lambda root: _peft_folder(root, {"r": 4, "lora_alpha": float("nan")}),
    "adapter_config.json 1e39": lambda root: _peft_folder(root, {"r": 4, "lora_alpha": 1e39}),
    "kohya alpha 1e30": lambda root: _kohya(root, 1e30),
}


def _kohya(root, alpha):
    g = torch.Generator().manual_seed(0)
    flat = "lora_unet_" + Q.replace(".", "_")
    safetensors.torch.save_file({f"{flat}.lora_down.weight": torch.randn(4, 32, generator=g),
                                 f"{flat}.lora_up.weight": torch.randn(32, 4, generator=g),
                                 f"{flat}.alpha": torch.tensor(alpha)}, str(root / "k.safetensors"))
    return str(root / "k.safetensors")


@pytest.mark.parametrize("case", list(ALPHAS))
def test_alpha_must_be_finite_and_bounded(eng, root, case):
    path = ALPHAS[case](root)
    with pytest.raises(impasto.AdapterValueError, match="alpha"):
        eng.adapters.register("a", path)
    # the bound: |alpha| <= 1e4 * rank is accepted
    ok = lora_file(root / "ok.safetensors", metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4e4})})
    eng.adapters.register("ok", ok)


def test_messages_name_file_and_adapter(eng, root):
    p = lora_file(root / "big.safetensors", rank=16)
    with pytest.raises(impasto.AdapterValueError) as e:
        eng.adapters.register("big-one", p)
    assert "'big-one'" in str(e.value) and "big.safetensors" in str(e.value) and "max_rank=8" in str(e.value)
    # the slot pools too (a file that grew past max_rank since it was read)
    lora = impasto.adapters.lora_formats.read_lora(p, dict(eng.base.unet.named_modules()))
    with pytest.raises(impasto.AdapterValueError) as e:
        eng.lora.load("big-one", lora, set())
    assert "'big-one'" in str(e.value) and "big.safetensors" in str(e.value)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_pickle_refusal_does_not_advise_weights_only_false(eng, root):
    torch.save({"unet": {"x": _Exploit()}}, root / "delta.bin")
    with pytest.raises(impasto.AdapterFormatError) as e:
        eng.adapters.register("p", str(root / "delta.bin"))
    assert "weights_only" not in str(e.value) and "delta.bin" in str(e.value)


def test_renamed_kv_token_fails_its_request_naming_the_file(eng, root):
    p = kv_file(root / "c.safetensors", eng, token="<a>")
    eng.adapters.register("c", p)
    lora_file(root / "g.safetensors")
    eng.adapters.register("g", str(root / "g.safetensors"))
    kv_file(root / "c.safetensors", eng, token="<b>")
    out, good = eng.generate_batch([request(["c"], prompt="a <a> star"), request(["g"])])
    assert isinstance(out.error, impasto.AdapterError), out.error
    assert "c.safetensors" in str(out.error) and "<a>" in str(out.error)
    assert good.error is None


# ---------------------------------------------------------------------------------------------
# Files that change after registration, and slots left dirty.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["rank above max_rank", "another shape", "a module the base lacks"])
def test_changed_file_fails_only_its_request(eng, root, change):
    p = lora_file(root / "a.safetensors")
    eng.adapters.register("a", p)
    eng.adapters.register("b", lora_file(root / "b.safetensors", seed=2))
    solo = eng.generate_batch([request(["b"])])[0]
    time.sleep(0.01)
    if change == "rank above max_rank":
        lora_file(p, rank=16)
    elif change == "another shape":
        lora_file(p, width=64, keys=(Q,), seed=4)
    else:
        lora_file(p, keys=("down_blocks.7.attentions.0.proj_in",), seed=4)
    out_a, out_b = eng.generate_batch([request(["a"]), request(["b"])])
    assert isinstance(out_a.error, impasto.AdapterError), out_a.error
    assert "a.safetensors" in str(out_a.error) and "changed since" in str(out_a.error)
    assert out_b.error is None and np.array_equal(out_b.images, solo.images)


def test_changed_file_that_still_fits_is_served_with_its_new_weights(tiny_dir, eng, root):
    """(Also: a file now targeting another module is served as the new file, not refused.)"""
    p = lora_file(root / "a.safetensors")
    eng.adapters.register("a", p)
    first = eng.generate_batch([request(["a"])])[0].images
    eng.adapters._host.clear()
    lora_file(p, keys=(Q, Q2), seed=7)
    second = eng.generate_batch([request(["a"])])[0]
    assert second.error is None and not np.array_equal(first, second.images)
    fresh = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root), max_rank=8)
    fresh.adapters.register("a", p)
    assert np.array_equal(fresh.generate_batch([request(["a"])])[0].images, second.images)


def test_failed_slot_copy_leaves_no_weights_behind(tiny_dir, root, monkeypatch):
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root), max_rank=8, slots_per_bucket=1)
    # modules are copied in name order: to_q is written, then the copy of to_v fails
    eng.adapters.register("bad", lora_file(root / "bad.safetensors", keys=(Q, QV), seed=1))
    eng.adapters.register("good", lora_file(root / "good.safetensors", keys=(QV,), seed=2))
    runtime = eng.lora
    real_pool, calls = runtime._pool, []

    def failing_pool(module, bucket):
        calls.append(module)
        if len(calls) == 2:
            raise MemoryError("out of memory while copying")
        return real_pool(module, bucket)

    monkeypatch.setattr(runtime, "_pool", failing_pool)
    assert eng.generate_batch([request(["bad"])])[0].error is not None
    monkeypatch.setattr(runtime, "_pool", real_pool)
    served = eng.generate_batch([request(["good"])])[0]
    fresh = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root), max_rank=8, slots_per_bucket=1)
    fresh.adapters.register("good", str(root / "good.safetensors"))
    assert np.array_equal(served.images, fresh.generate_batch([request(["good"])])[0].images)


# ---------------------------------------------------------------------------------------------
# True host memory accounting.
# ---------------------------------------------------------------------------------------------


def _storages(objs):
    """Distinct storages of every tensor held by loaded LoRA/kv files (layers, tokens, text encoder)."""
    seen = {}
    for obj in objs:
        tensors = [t for layer in obj.layers.values() for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        tensors += [t for layer in obj.layers.values() for pair in vars(layer).values() if isinstance(pair, tuple)
                    for t in pair if isinstance(t, torch.Tensor)]
        tensors += list(getattr(obj, "tokens", {}).values()) + list(getattr(obj, "text_encoder_layers", {}).values())
        for t in tensors:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def test_host_bytes_are_the_held_storages(eng, root):
    half = eng.adapters.register("half", lora_file(root / "h.safetensors", dtype=torch.float16, keys=(Q, Q2)))
    eng.adapters.register("kv", kv_file(root / "k.safetensors", eng))
    outs = eng.generate_batch([request(["half"]), request(["kv"], prompt="a <a> star")])
    assert all(o.error is None for o in outs)
    held = [obj for obj, _ in eng.adapters._host.values()]
    assert eng.adapters.resident_bytes()["host"] == _storages(held) > 0
    assert _storages([eng.adapters.load("half")]) == 2 * half.nbytes  # fp16 on disk, held as fp32


def test_zero_host_budget_holds_nothing_after_the_batch(eng, root, monkeypatch):
    monkeypatch.setattr(eng.adapters, "host_cache_bytes", 0)
    eng.adapters._host.clear()
    eng.adapters.register("a", lora_file(root / "a.safetensors"))
    refs = []
    family = FAMILIES["lora"]
    real = type(family).load
    monkeypatch.setattr(type(family), "load", lambda self, store, info: (
        lambda obj: (refs.append(weakref.ref(obj)), obj)[1])(real(self, store, info)))
    assert eng.generate_batch([request(["a"])])[0].error is None
    assert eng.adapters.resident_bytes()["host"] == 0
    import gc

    gc.collect()
    assert refs and all(r() is None for r in refs)  # nothing (not the slot pools either) keeps the file alive
    assert eng.generate_batch([request(["a"])])[0].error is None  # and it loads again
