"""LoRA file readers: every layout, written by its own tool, read back to PEFT's own numbers.

Ground truth is never typed in: each file is written by diffusers / PEFT from a tiny UNet that
carries a PEFT adapter with random non-zero A and B, and the reader's (A, B, scale) per module is
compared with
  * the writer's PEFT modules (``lora_A["default"].weight``, ``lora_B[...]``, ``scaling[...]``)
    for files that carry alpha, and
  * a fresh UNet into which diffusers (``lora_state_dict`` + ``load_lora_into_unet``, which is
    what ``pipe.load_lora_weights`` runs for the UNet; ``unet.load_lora_adapter``) or PEFT
    (``PeftModel.from_pretrained``) loaded the same file: its resulting r, scaling and weights.
See env.md "Known traps": diffusers guesses the key layout from the FIRST key, so mixed
``lora.down``/``lora_A`` files only partly load; the diffusers reference is fed those files with
keys made uniform by diffusers' own ``convert_unet_state_dict_to_peft``.
"""

import json
import math
import os
import pathlib
import struct

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from impasto.adapters.lora_formats import read_lora, read_lora_header
from impasto.errors import AdapterFormatError, AdapterShapeError, AdapterUnsupportedError, AdapterValueError

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
ALL_LINEAR = ATTN + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "time_embedding.linear_1", "time_emb_proj"]
WEIGHT = "pytorch_lora_weights.safetensors"


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        sample_size=16,
        norm_num_groups=32,
    )


@pytest.fixture(scope="module")
def names():
    return [n for n, _ in tiny_unet().named_modules()]


def lora_unet(seed=1, **config):
    unet = tiny_unet()
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(init_lora_weights=False, **config))
    return unet


def peft_layers(model, adapter=None):
    """{module name relative to the UNet: (A, B, r, scaling)} of every PEFT LoRA module."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PeftLoraLayer):
            a = adapter or next(iter(m.lora_A))
            name = name.removeprefix("base_model.model.")
            out[name] = (m.lora_A[a].weight.detach(), m.lora_B[a].weight.detach(), m.r[a], m.scaling[a])
    return out


def assert_same(lf, truth, scale=None):
    """The reader returned exactly truth's modules, with equal A, B and scale (or `scale` everywhere)."""
    assert set(lf.layers) == set(truth), set(lf.layers) ^ set(truth)
    for name, (a, b, r, scaling) in truth.items():
        layer = lf.layers[name]
        assert torch.equal(layer.down, a.float().flatten(1)), name  # 1x1 conv [r, in, 1, 1] -> [r, in]
        assert torch.equal(layer.up, b.float().flatten(1)), name
        assert layer.rank == r, name
        assert layer.scale == pytest.approx(scaling if scale is None else scale, rel=1e-6), name


def diffusers_pipe_load(path):
    """What pipe.load_lora_weights does for the UNet, with keys made uniform (the known trap)."""
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(path, return_lora_metadata=True)
    state_dict = convert_unet_state_dict_to_peft(state_dict)
    unet = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, unet, metadata=metadata)
    return peft_layers(unet)


def check_header(path, names, lf):
    h = read_lora_header(path, names)
    assert h.format == lf.format and set(h.layers) == set(lf.layers)
    for name, info in h.layers.items():
        layer = lf.layers[name]
        assert (info.rank, info.out_features, info.in_features) == (layer.rank, *layer.up.shape[:1], layer.down.shape[1])
        assert info.scale == layer.scale
    assert h.nbytes == sum(l.down.numel() + l.up.numel() for l in lf.layers.values()) * 4  # written in fp32


# --- diffusers: convert_state_dict_to_diffusers + save_lora_weights --------------------------------------


def test_diffusers_old_attention_only_loads_like_pipe(tmp_path, names):
    unet = lora_unet(r=4, lora_alpha=8, target_modules=ATTN)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    assert all(".lora.down." in k or ".lora.up." in k for k in load_file(tmp_path / WEIGHT))
    lf = read_lora(tmp_path, names)
    assert lf.format == "diffusers-old"
    # save_lora_weights without metadata drops lora_alpha: diffusers loads the file at scale 1.
    assert_same(lf, peft_layers(unet), scale=1.0)
    # All-old keys: diffusers loads them as is, no uniformizing needed.
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path))
    ref_unet = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, ref_unet)
    assert_same(lf, peft_layers(ref_unet))
    check_header(tmp_path, names, lf)


@pytest.mark.parametrize("with_metadata", [False, True], ids=["no-metadata", "metadata"])
def test_diffusers_mixed_keys_every_layer(tmp_path, names, with_metadata):
    unet = lora_unet(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 3})
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    assert any(".lora.down." in k for k in state) and any(".lora_A." in k for k in state)  # the mixed layout
    meta = unet.peft_config["default"].to_dict() if with_metadata else None
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    lf = read_lora(tmp_path / WEIGHT, names)
    assert lf.format == "diffusers-old"
    truth = peft_layers(unet)
    assert {n.rsplit(".", 1)[-1] for n in truth} >= {"to_q", "proj_in", "proj_out", "2", "proj", "linear_1", "time_emb_proj"}
    assert_same(lf, truth, scale=None if with_metadata else 1.0)
    assert_same(lf, diffusers_pipe_load(str(tmp_path)))
    check_header(tmp_path, names, lf)


def test_diffusers_lora_A_keys_with_metadata_rslora(tmp_path, names):
    unet = lora_unet(r=6, lora_alpha=5, use_rslora=True, target_modules=ALL_LINEAR, alpha_pattern={"ff.net.2": 7})
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )
    lf = read_lora(tmp_path, names)
    assert lf.format == "diffusers" and "lora_adapter_metadata" in lf.metadata
    assert_same(lf, peft_layers(unet))
    # Uniform lora_A keys: the file goes into diffusers untouched.
    state_dict, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(tmp_path), return_lora_metadata=True)
    ref_unet = tiny_unet()
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, ref_unet, metadata=metadata)
    assert_same(lf, peft_layers(ref_unet))
    assert {l.scale for l in lf.layers.values()} == {5 / math.sqrt(6), 7 / math.sqrt(6)}


@pytest.mark.parametrize(
    "config",
    [
        dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"proj_in": 2, "^up_blocks.0.attentions.1.proj_out": 3}, alpha_pattern={"to_v": 3}),
        dict(r=3, lora_alpha=2, use_rslora=True, target_modules=["to_k", "ff.net.0.proj", "proj_out"]),
    ],
    ids=["patterns", "rslora"],
)
def test_save_lora_adapter(tmp_path, names, config):
    unet = lora_unet(**config)
    unet.save_lora_adapter(tmp_path)
    lf = read_lora(tmp_path, names)
    assert lf.format == "diffusers-adapter"
    assert_same(lf, peft_layers(unet))
    ref_unet = tiny_unet()
    ref_unet.load_lora_adapter(str(tmp_path), prefix=None, weight_name=WEIGHT)
    assert_same(lf, peft_layers(ref_unet))
    check_header(tmp_path, names, lf)


def test_diffusers_alpha_tensors_ignored_like_diffusers(tmp_path, names):
    unet = lora_unet(r=4, lora_alpha=8, target_modules=["to_q", "proj_in"])
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    state.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0) for k in list(state) if k.endswith("lora_A.weight")})
    save_file(state, tmp_path / "a.safetensors")
    lf = read_lora(tmp_path / "a.safetensors", names)
    assert lf.notes and "alpha" in lf.notes[0]
    assert_same(lf, diffusers_pipe_load(str(tmp_path / "a.safetensors")), scale=1.0)


# --- PEFT: PeftModel.save_pretrained -------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, as_file",
    [
        (dict(r=4, lora_alpha=6, target_modules=ALL_LINEAR, rank_pattern={"to_q": 2}, alpha_pattern={"proj_out": 11}), False),
        (dict(r=5, lora_alpha=3, use_rslora=True, target_modules=["to_v", "ff.net.2", "proj_in"]), True),
    ],
    ids=["patterns-folder", "rslora-file"],
)
def test_peft_save_pretrained(tmp_path, names, config, as_file):
    torch.manual_seed(2)
    model = get_peft_model(tiny_unet(), LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors" if as_file else tmp_path
    lf = read_lora(path, names)
    assert lf.format == "peft"
    assert_same(lf, peft_layers(model))
    assert_same(lf, peft_layers(PeftModel.from_pretrained(tiny_unet(), tmp_path)))
    check_header(path, names, lf)


def test_peft_weights_without_config_refused(tmp_path, names):
    model = get_peft_model(tiny_unet(), LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(AdapterFormatError, match="adapter_config.json"):
        read_lora(tmp_path / "adapter_model.safetensors", names)


# --- kohya ---------------------------------------------------------------------------------------------


def write_kohya(path, unet, alpha_of, extra=None):
    """kohya naming from a PEFT state dict: lora_unet_ + module with '.'->'_', lora_down/lora_up/alpha."""
    state = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, kind = key.rsplit(".lora_", 1)
        flat = "lora_unet_" + module.replace(".", "_")
        state[flat + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")] = value.contiguous()
        alpha = alpha_of(module)
        if alpha is not None:
            state[flat + ".alpha"] = torch.tensor(float(alpha))
    state.update(extra or {})
    if str(path).endswith(".bin"):
        torch.save(state, path)
    else:
        save_file(state, path)
    return state


def test_kohya_uniform_alpha_matches_diffusers(tmp_path, names):
    unet = lora_unet(r=4, lora_alpha=8, target_modules=ALL_LINEAR, rank_pattern={"proj_in": 2})
    path = tmp_path / "k.safetensors"
    write_kohya(path, unet, lambda m: 3)
    lf = read_lora(path, names)
    assert lf.format == "kohya"
    truth = peft_layers(unet)
    assert_same(lf, {n: (a, b, r, 3 / r) for n, (a, b, r, _) in truth.items()})
    assert_same(lf, diffusers_pipe_load(str(path)))
    check_header(path, names, lf)


def test_kohya_per_module_alpha(tmp_path, names):
    """Unequal alphas: alpha_i / r_i per module (kohya's rule). diffusers agrees off the attention
    projections; on them it applies the most common alpha (its alpha_pattern keys match no module)."""
    unet = lora_unet(r=4, lora_alpha=4, target_modules=ALL_LINEAR)
    modules = sorted(peft_layers(unet))
    alphas = {m: [1.0, 2.0, 4.0, None][i % 4] for i, m in enumerate(modules)}  # None: no .alpha -> alpha = r
    path = tmp_path / "k.safetensors"
    write_kohya(path, unet, alphas.get)
    lf = read_lora(path, names)
    truth = peft_layers(unet)
    assert_same(lf, {n: (a, b, r, (alphas[n] or r) / r) for n, (a, b, r, _) in truth.items()})
    with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match any targeted module"):
        ref = diffusers_pipe_load(str(path))  # the diffusers quirk the docstring describes
    agree = {n: v for n, v in ref.items() if not n.endswith(tuple(ATTN)) and alphas[n] is not None}
    assert len(agree) > 5
    for n, (a, b, r, scaling) in agree.items():
        assert lf.layers[n].scale == pytest.approx(scaling)


def test_kohya_bin_with_text_encoder_keys(tmp_path, names):
    unet = lora_unet(r=2, lora_alpha=2, target_modules=["to_q", "ff.net.2", "time_embedding.linear_1"])
    te = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "k.bin"
    write_kohya(path, unet, lambda m: 1, extra=te)
    lf = read_lora(path, names)
    assert_same(lf, {n: (a, b, r, 1 / r) for n, (a, b, r, _) in peft_layers(unet).items()})
    assert set(lf.text_encoder_layers) == set(te)
    for k, v in te.items():
        assert torch.equal(lf.text_encoder_layers[k], v)
    assert read_lora_header(path, names).text_encoder_keys == list(te)


def test_text_encoder_only_file(tmp_path, names):
    path = tmp_path / "te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 32)}, path)
    lf = read_lora(path, names)
    assert (lf.format, lf.layers, list(lf.text_encoder_layers)) == ("kohya", {}, ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"])


def test_diffusers_text_encoder_keys_returned_raw(tmp_path, names):
    unet = lora_unet(r=2, lora_alpha=4, target_modules=["to_k"])
    te = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32)}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers={})
    state = dict(load_file(tmp_path / WEIGHT), **te)
    save_file(state, tmp_path / WEIGHT)
    lf = read_lora(tmp_path, names)
    assert_same(lf, peft_layers(unet), scale=1.0)
    assert list(lf.text_encoder_layers) == list(te) and torch.equal(lf.text_encoder_layers[list(te)[0]], list(te.values())[0])


def test_dtype_and_1x1_conv(tmp_path, names):
    unet = lora_unet(r=4, lora_alpha=4, target_modules=["proj_in", "proj_out"])
    assert all(a.ndim == 4 for a, *_ in peft_layers(unet).values())  # this UNet's proj_in/out are 1x1 convs
    unet.save_lora_adapter(tmp_path)
    lf = read_lora(tmp_path, names, dtype=torch.float16)
    for name, (a, b, *_rest) in peft_layers(unet).items():
        assert lf.layers[name].down.dtype == torch.float16
        assert torch.equal(lf.layers[name].down, a.flatten(1).half()) and torch.equal(lf.layers[name].up, b.flatten(1).half())


# --- refusals ------------------------------------------------------------------------------------------


class _Payload:
    """Pickles to a call that writes `marker` when unpickled by an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "executed"))


def _peft_file(tmp_path, **config):
    unet = lora_unet(**config)
    unet.save_lora_adapter(tmp_path)
    return tmp_path / WEIGHT


def _kohya_file(tmp_path, extra, target=("to_q",)):
    path = tmp_path / "k.safetensors"
    write_kohya(path, lora_unet(r=2, lora_alpha=2, target_modules=list(target)), lambda m: 1, extra=extra)
    return path


def _edit(path, fn):
    state = load_file(path)
    fn(state)
    save_file(state, path)
    return path


KQ = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def case_dora_kohya(tmp_path):
    return _kohya_file(tmp_path, {KQ + ".dora_scale": torch.ones(1, 64)}), AdapterUnsupportedError, "DoRA", "dora_scale"


def case_loha_incomplete(tmp_path):
    extra = {f"{KQ}.hada_{w}": torch.randn(2, 64) for w in ("w1_a", "w1_b", "w2_a")}
    path = tmp_path / "k.safetensors"
    save_file(dict(extra, **{KQ + ".alpha": torch.tensor(1.0)}), path)
    return path, AdapterFormatError, "LoHa", "hada_w1_a"


def case_lokr_both_halves(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file({KQ + ".lokr_w1": torch.randn(8, 8), KQ + ".lokr_w1_a": torch.randn(8, 2), KQ + ".lokr_w2": torch.randn(8, 8)}, path)
    return path, AdapterFormatError, "LoKr", "lokr_w1"


def case_unknown_key(tmp_path):
    path = _peft_file(tmp_path, r=2, lora_alpha=2, target_modules=["to_q"])
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_C.weight"
    return _edit(path, lambda s: s.update({key: torch.zeros(2, 2)})), AdapterFormatError, "unknown key", key


def case_other_base(tmp_path):
    path = _peft_file(tmp_path, r=2, lora_alpha=2, target_modules=["to_q"])
    key = "down_blocks.7.attentions.0.to_q.lora_A.weight"
    return _edit(path, lambda s: s.update({key: torch.zeros(2, 4), key.replace("lora_A", "lora_B"): torch.zeros(4, 2)})), AdapterShapeError, "another base model", key


def case_rank_mismatch(tmp_path):
    path = _kohya_file(tmp_path, {})
    return _edit(path, lambda s: s.update({KQ + ".lora_up.weight": torch.zeros(64, 3)})), AdapterShapeError, "rank", KQ + ".lora_up.weight"


def case_truncated(tmp_path):
    path = _peft_file(tmp_path, r=2, lora_alpha=2, target_modules=["to_q"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path, AdapterFormatError, "safetensors", str(path)


def case_corrupt_header(tmp_path):
    path = _peft_file(tmp_path, r=2, lora_alpha=2, target_modules=["to_q"])
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + n] = b"{" + b"x" * (n - 1)
    path.write_bytes(bytes(data))
    return path, AdapterFormatError, "safetensors", str(path)


def case_missing(tmp_path):
    return tmp_path / "nope.safetensors", AdapterFormatError, "no such file", "nope.safetensors"


def case_missing_up(tmp_path):
    path = _kohya_file(tmp_path, {})
    return _edit(path, lambda s: s.pop(KQ + ".lora_up.weight")), AdapterFormatError, "no up", KQ + ".lora_down.weight"


REFUSALS = [case_dora_kohya, case_loha_incomplete, case_lokr_both_halves, case_unknown_key, case_other_base,
            case_rank_mismatch, case_truncated, case_corrupt_header, case_missing, case_missing_up]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.__name__.removeprefix("case_") for c in REFUSALS])
def test_refusals(tmp_path, names, case):
    path, error, what, key = case(tmp_path)
    for read in (read_lora_header, read_lora):
        with pytest.raises(error, match=what) as info:
            read(path, names)
        assert key in str(info.value) and str(path.name) in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_refused_at_full_read_only(tmp_path, names, bad):
    path = _peft_file(tmp_path, r=2, lora_alpha=2, target_modules=["to_q", "to_k"])
    key = sorted(load_file(path))[3]
    _edit(path, lambda s: s[key].view(-1).__setitem__(1, bad))
    assert len(read_lora_header(path, names).layers) == 16  # the header read does not look at values
    with pytest.raises(AdapterValueError, match="NaN" if math.isnan(bad) else "Inf") as info:
        read_lora(path, names)
    assert key in str(info.value)


def test_fp16_overflow_refused(tmp_path, names):
    path = _peft_file(tmp_path, r=2, lora_alpha=2, target_modules=["to_q"])
    key = sorted(load_file(path))[0]
    _edit(path, lambda s: s[key].view(-1).__setitem__(0, 1e6))
    read_lora(path, names)  # fine in fp32
    with pytest.raises(AdapterValueError, match="Inf"):
        read_lora(path, names, dtype=torch.float16)


def test_malicious_bin_never_executed(tmp_path, names):
    marker, proof = tmp_path / "marker", tmp_path / "proof"
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    torch.save({key: _Payload(proof)}, tmp_path / "proof.bin")
    torch.load(tmp_path / "proof.bin", weights_only=False)  # the payload is live: an unrestricted load runs it
    assert proof.exists()
    torch.save({key: _Payload(marker)}, tmp_path / "evil.bin")
    for read in (read_lora_header, read_lora):
        with pytest.raises(AdapterFormatError, match="evil.bin"):
            read(tmp_path / "evil.bin", names)
    assert not marker.exists()


def test_peft_config_refusals(tmp_path, names):
    torch.manual_seed(3)
    model = get_peft_model(tiny_unet(), LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    read_lora(tmp_path, names)
    for field, value, what in [("lora_bias", True, "bias"), ("peft_type", "LOHA", "LOHA"), ("r", 3, "rank 3")]:
        config_path.write_text(json.dumps(dict(config, **{field: value})))
        with pytest.raises(AdapterFormatError, match=what) as info:
            read_lora(tmp_path, names)
        assert "adapter_config.json" in str(info.value)
