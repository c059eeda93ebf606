"""The adapter-family registry and the one file layer.

(a) a family is one class plus one `register_family` line: a toy family defined here is
detected, registered, loaded, planned and served; (b) every built-in family is in the registry
and claims its own files; (c) family request rules, rank1's option types among them; (d) the
file layer's checks at every open.
"""

import contextlib
import os

import numpy as np
import pytest
import safetensors.torch
import torch

import impasto
from impasto.adapters import files as file_layer
from impasto.adapters import kv as kv_format
from impasto.adapters import rank1 as rank1_format
from impasto.adapters.families import FAMILIES, Family, detect_family, register_family, unregister_family
from impasto.adapters.families.lora import LoraFamily
from impasto.adapters.store import LORA_LIKE, AdapterStore
from impasto.api import AdapterInfo
from impasto.attention import cross_attention_layers
from impasto.loading import load_base_model
from impasto.plan import Branch, build_plan

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
TOY_LAYER = "impasto.toy.layer"


# --- (a) a family in one class and one line -------------------------------------------------------


class ConstantV(Family):
    """Toy family: adds `scale * value` to every entry of V in one attn2 layer. Its file is a
    safetensors holding one scalar "value", the layer in the header metadata."""

    name = "toy"

    def detect(self, path, metadata):
        return path.endswith(".toy.safetensors")

    def register(self, store, name, path, *, suffix, token):
        header = file_layer.read_header(path)
        layer = header.metadata.get(TOY_LAYER)
        if layer not in cross_attention_layers(store.unet):
            raise impasto.AdapterShapeError(f"{path}: no attn2 layer {layer!r}")
        return AdapterInfo(name=name, path=path, family=self.name, format="toy", rank=0, targets=(layer,), nbytes=4)

    def load(self, store, info):
        metadata, tensors = file_layer.read_safetensors(info.path)
        return metadata[TOY_LAYER], float(tensors["value"])

    def kv_edit(self, store, rows):
        def edit(layer, attn, k, v, key_embeds, embeds):
            bump = torch.zeros(v.shape[0], 1, 1, dtype=v.dtype)
            for r, row in enumerate(rows):
                for use in row:
                    target, value = use.file
                    if target == layer:
                        bump[r] += use.scale * value
            return k, v + bump

        return edit


@pytest.fixture
def toy():
    family = register_family(ConstantV())  # the one line
    try:
        yield family
    finally:
        unregister_family("toy")


class NoLora:
    """A LoRA runtime with nothing to apply: the plan is tested apart from the engine's runtimes."""

    def activate(self, rows, files):
        assert not any(rows), rows
        return contextlib.nullcontext()


def _toy_file(path, layer, value):
    safetensors.torch.save_file({"value": torch.tensor(value)}, str(path), metadata={TOY_LAYER: layer})
    return str(path)


def test_toy_family_is_detected_registered_loaded_and_planned(tiny_dir, tmp_path, toy):
    base = load_base_model(tiny_dir, device="cpu", dtype=torch.float32)
    store = AdapterStore(base.unet, text_encoder=base.text_encoder, root=str(tmp_path))
    attn2 = cross_attention_layers(base.unet)
    layer = list(attn2)[1]
    path = _toy_file(tmp_path / "bright.toy.safetensors", layer, 0.25)

    assert detect_family(path) == "toy"  # asked before lora, which would take any file
    info = store.register("bright", path)
    assert info.family == "toy" and store.family("bright") is toy
    file = store.load("bright")
    assert file == (layer, 0.25)
    store.check_use(impasto.Adapter("bright", 0.5))
    with pytest.raises(impasto.RequestError, match="takes no options"):
        store.check_use(impasto.Adapter("bright", beta=1.0))
    assert store.lora_rows((("bright", 0.5, ()),), {"bright": file}) == []

    branches = [Branch("a red star"), Branch("a red star", (("bright", 0.5, ()),)), Branch("a red star")]
    plan = build_plan(branches, base, attn2, NoLora(), store, {"bright": file}, "cpu", torch.float32)
    assert plan.index == [0, 1, 0]
    with torch.inference_mode():
        for name, attn in attn2.items():
            k, v = attn.to_k(plan.embeds), attn.to_v(plan.embeds)
            if name == layer:
                v[1] += 0.5 * 0.25
            assert torch.equal(plan.kv[name][0], k), name
            assert torch.equal(plan.kv[name][1], v), name


def test_toy_family_is_served_by_the_engine(tiny_dir, tmp_path, toy):
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(tmp_path))
    layer = list(cross_attention_layers(eng.base.unet))[0]
    eng.adapters.register("bright", _toy_file(tmp_path / "bright.toy.safetensors", layer, 3.0))
    run = lambda adapters: eng.generate("a red star", adapters=adapters, steps=2, seed=0, output_type="np").images  # noqa: E731
    plain = run([])
    assert float(np.abs(run([("bright", 0.0)]) - plain).max()) <= 1e-6
    assert float(np.abs(run(["bright"]) - plain).max()) > 1e-3


def test_registry_refuses_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="already registered"):
        register_family(LoraFamily())
    with pytest.raises(ValueError, match="must match"):
        register_family(type("Bad", (Family,), {"name": "no spaces"})())
    with pytest.raises(TypeError):
        register_family(object())
    with pytest.raises(ValueError, match="no family"):
        unregister_family("nope")


# --- (b) the built-in families -------------------------------------------------------------------


def _lora(path, metadata=None):
    torch.manual_seed(0)
    safetensors.torch.save_file({f"unet.{Q}.lora_A.weight": torch.randn(4, 32), f"unet.{Q}.lora_B.weight": torch.randn(32, 4)},
                                str(path), metadata=metadata)
    return str(path)


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


def _kv_delta_bin(folder, unet):
    """The original repo's output folder: checkpoints/delta.bin holding full W_k, W_v and the token."""
    (folder / "checkpoints").mkdir(parents=True)
    weights = {f"{name}.{proj}.weight": w + 0.1 for name, pair in kv_format.base_kv_weights(unet).items()
               for proj, w in zip(("to_k", "to_v"), pair)}
    torch.save({"unet": weights, "modifier_token": {"<new1>": torch.ones(unet.config.cross_attention_dim)}},
               folder / "checkpoints" / "delta.bin")
    return str(folder)


def _kv_compressed(path, unet):
    layers = {name: kv_format.KvLayer(k_factors=(torch.ones(wk.shape[0], 2), torch.ones(2, wk.shape[1])),
                                      v_factors=(torch.ones(wv.shape[0], 2), torch.ones(2, wv.shape[1])))
              for name, (wk, wv) in kv_format.base_kv_weights(unet).items()}
    kv_format.write_kv(path, kv_format.KvFile(path="", format="kv", layers=layers, tokens={"<c>": torch.ones(unet.config.cross_attention_dim)}))
    return str(path)


def _rank1(path, unet, text_encoder):
    shapes = rank1_format.base_shapes(unet)
    dim = text_encoder.get_input_embeddings().weight.shape[1]
    rank1_format.write_rank1(
        path, layers={n: (torch.ones(k[0]), torch.ones(v[0])) for n, (k, v) in shapes.items()},
        i_star=torch.ones(next(iter(shapes.values()))[0][1]), token_embedding=torch.ones(dim),
        placeholder="<teddy>", super_word="teddy", beta=0.7, tau=0.15, fingerprint=rank1_format.fingerprint(unet))
    return str(path)


@pytest.fixture
def builtins(tiny_dir, tmp_path):
    """An engine with one registered adapter of each built-in family, and their paths."""
    root = tmp_path / "root"
    root.mkdir()
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(root))
    unet = eng.base.unet
    paths = {
        "lora": _lora(root / "l.safetensors"),
        "style": _lora(root / "s.safetensors", metadata={"impasto.style_suffix": "in ink"}),
        "kv": _kv_diffusers(root / "cd", unet),
        "kv-delta": _kv_delta_bin(root / "orig", unet),
        "kv-compressed": _kv_compressed(root / "c.kv.safetensors", unet),
        "rank1": _rank1(root / "teddy.safetensors", unet, eng.base.text_encoder),
    }
    for name, path in paths.items():
        eng.adapters.register(name, path)
    return eng, paths


def test_every_builtin_family_claims_its_own_files(builtins):
    eng, paths = builtins
    assert list(FAMILIES)[:4] == ["lora", "style", "kv", "rank1"] and LORA_LIKE == ("lora", "style")
    for name, path in paths.items():
        family = name.split("-")[0]
        assert FAMILIES[family].name == family and isinstance(FAMILIES[family], Family)
        metadata = file_layer.header_metadata(path) if os.path.isfile(path) else {}
        assert FAMILIES[family].detect(path, metadata), name
        assert detect_family(path) == family, name
        assert eng.adapters.info(name).family == family and eng.adapters.family(name) is FAMILIES[family]
        eng.adapters.load(name)
    assert eng.adapters.info("style").suffix == "in ink"
    assert eng.adapters.info("rank1").token == "<teddy>"
    assert eng.adapters.info("kv-compressed").token_map == (("<c>", "<c>"),)


def test_style_family_needs_a_lora_file(builtins):
    eng, paths = builtins
    with pytest.raises(impasto.AdapterFormatError, match="must be a LoRA file, this one holds 'kv'"):
        eng.adapters.register("not-a-style", paths["kv"], family="style")


def test_lora_rows_per_family(builtins):
    eng, _ = builtins
    files = {n: eng.adapters.load(n) for n in eng.adapters.names()}
    branch = tuple((n, 0.5, ()) for n in ("lora", "kv", "rank1", "style"))
    assert eng.adapters.lora_rows(branch, files) == [("lora", 0.5), ("style", 0.5)]


# --- (c) request rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("options, option", [
    (dict(beta="abc"), "beta"),
    (dict(beta=True), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(tau=0), "tau"),
    (dict(tau=-0.5), "tau"),
    (dict(tau=float("inf")), "tau"),
    (dict(tau="0.1"), "tau"),
    (dict(global_lock="yes"), "global_lock"),
    (dict(global_lock=1), "global_lock"),
])
def test_rank1_option_types(builtins, options, option):
    eng, _ = builtins
    with pytest.raises(impasto.RequestError, match=rf"'rank1'.*{option}"):
        eng.adapters.check_use(impasto.Adapter("rank1", **options))


def test_family_rules(builtins):
    eng, _ = builtins
    check = eng.adapters.check_use
    check(impasto.Adapter("rank1", beta=0.5, tau=np.float32(0.1), global_lock=True))
    check(impasto.Adapter("rank1", beta=1))
    with pytest.raises(impasto.RequestError, match="beta and tau, not a scale"):
        check(impasto.Adapter("rank1", 0.5))
    with pytest.raises(impasto.RequestError, match=r"unknown rank1 options \['gamma'\]"):
        check(impasto.Adapter("rank1", gamma=1))
    with pytest.raises(impasto.AdapterNameError, match="name it in guidance.styles"):
        check(impasto.Adapter("style"))
    with pytest.raises(impasto.RequestError, match=r"\(kv\) takes no options"):
        check(impasto.Adapter("kv", beta=1.0))
    with pytest.raises(impasto.AdapterNameError, match="not registered"):
        check(impasto.Adapter("nope"))


def test_bad_rank1_option_fails_only_its_request(builtins):
    """beta="abc" reached float() in the plan and crashed the whole batch; now it is the request's error."""
    eng, _ = builtins
    bad, good = (impasto.Request(p, adapters=a, steps=1, output_type="np")
                 for p, a in (("a <teddy>", [impasto.Adapter("rank1", beta="abc")]), ("a red star", [])))
    outs = eng.generate_batch([bad, good])
    assert isinstance(outs[0].error, impasto.RequestError) and "beta" in str(outs[0].error)
    assert outs[1].error is None


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
