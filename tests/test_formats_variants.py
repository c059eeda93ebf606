"""LoCon (conv LoRA), LoHa, LoKr and DoRA files, written by their own tools, applied per row.

Every file is written by the reference tool itself: PEFT (`LoraConfig` with conv targets,
`use_dora=True`, `LoHaConfig`, `LoKrConfig`, `save_pretrained`), the `lycoris-lora` package
(`create_lycoris` with kohya's `lora_unet` prefix, `save_weights`). impasto reads the file and
applies it per row through the LoRA runtime's hooks on a fresh copy of the same base UNet; each
row of one batched forward must equal the tool's own model run on that row alone, at that row's
scale (PEFT `set_scale`, LyCORIS `set_multiplier`), rows without the adapter the base model.
kohya LoCon files also equal diffusers' own kohya conversion (`load_lora_weights`).
"""

import contextlib

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoHaConfig, LoKrConfig, LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors.torch import load_file, save_file

from impasto.adapters.lora import LoraRuntime
from impasto.adapters.lora_formats import read_lora, read_lora_header
from impasto.adapters.lora_variants import check_shapes, weight_shape
from impasto.errors import AdapterFormatError, AdapterShapeError

TOL = 1e-4  # fp32, the same math in another order
CONVS = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in"]


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, sample_size=16, norm_num_groups=32,
    ).eval()


@pytest.fixture(scope="module")
def names():
    return [n for n, _ in tiny_unet().named_modules()]


def inputs(rows, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500, 999, 250, 3, 700][:rows])
    e = torch.randn(rows, 7, 32, generator=g)
    return x, t, e


def served(lf, row_scales, adapters=None, xs=None):
    """One batched forward of a fresh base UNet with the LoRA runtime: row r applies
    row_scales[r] = [(name, scale), ...] (names in `adapters`, default {"a": lf}); inputs `xs`
    (default inputs(rows))."""
    unet = tiny_unet()
    files = adapters or {"a": lf}
    rt = LoraRuntime(unet, slots_per_bucket=4, max_adapters_per_row=4, device="cpu", dtype=torch.float32, max_rank=64)
    rt.set_tables(rt.tables(row_scales, files), len(row_scales))
    with torch.no_grad():
        out = unet(*(xs or inputs(len(row_scales)))).sample
    rt.close()
    return out


def reference_rows(model, scales, use, xs=None):
    """The tool's model run on each row alone at that row's scale (None: adapter disabled);
    use(model, s) is a context manager that sets it up; inputs `xs` (default inputs(rows))."""
    x, t, e = xs or inputs(len(scales))
    out = []
    for r, s in enumerate(scales):
        with torch.no_grad(), use(model, s):
            out.append(model(x[r:r + 1], t[r:r + 1], e[r:r + 1]).sample)
    return torch.cat(out)


def peft_scale(model, s):
    if s is None:
        return model.disable_adapter()  # PEFT's own switch: the base layers only
    for m in model.modules():
        if isinstance(m, (PeftLoraLayer, LycorisLayer)):
            m.set_scale("default", s)
    return contextlib.nullcontext()


def _randomize_peft(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:  # DoRA: a magnitude unlike the initial norms, so g != 1
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
            elif any(k in n for k in ("hada_", "lokr_", "lora_A", "lora_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


PEFT_CASES = {
    "conv-lora": LoraConfig(r=4, lora_alpha=8, target_modules=CONVS + LINEAR, init_lora_weights=False),
    "dora": LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "ff.net.2", "conv1"], use_dora=True,
                       init_lora_weights=False),
    "loha": LoHaConfig(r=4, alpha=8, target_modules=CONVS[:2] + LINEAR, init_weights=False),
    "loha-tucker": LoHaConfig(r=3, alpha=2, target_modules=["conv1", "to_q"], use_effective_conv2d=True,
                              init_weights=False),
    "lokr": LoKrConfig(r=2, alpha=3, target_modules=CONVS[:2] + LINEAR, init_weights=False),
    "lokr-both": LoKrConfig(r=2, alpha=3, target_modules=["to_q", "ff.net.2", "conv1"], decompose_both=True,
                            decompose_factor=4, use_effective_conv2d=True, init_weights=False),
}
KIND = {"conv-lora": "conv", "dora": "dora", "loha": "loha", "loha-tucker": "loha", "lokr": "lokr", "lokr-both": "lokr"}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_file_equals_peft_per_row(case, tmp_path, names):
    model = get_peft_model(tiny_unet(), PEFT_CASES[case])
    _randomize_peft(model, seed=len(case))
    model.save_pretrained(tmp_path)
    lf = read_lora(tmp_path, names)
    assert {v.kind for v in lf.variants.values()} == {KIND[case]}, {m: v.kind for m, v in lf.variants.items()}
    header = read_lora_header(tmp_path, names)
    assert header.nbytes == sum(t.numel() * 4 for v in lf.variants.values() for t in v.tensors.values()) + sum(
        (l.down.numel() + l.up.numel()) * 4 for l in lf.layers.values())
    scales = [1.7, None, 0.5]
    got = served(lf, [[("a", s)] if s is not None else [] for s in scales])
    ref = reference_rows(model, scales, peft_scale)
    assert (got - ref).abs().max().item() <= TOL
    x, t, e = inputs(3)
    base = reference_rows(model, [None], peft_scale, (x[2:], t[2:], e[2:]))
    assert (ref[2] - base[0]).abs().max().item() > 100 * TOL  # even at 0.5 the adapter moves the row


def _lycoris(algo, seed, **kw):
    """A tiny UNet wrapped by lycoris-lora with kohya's names (lora_unet_<module with _>), random factors."""
    from lycoris import LycorisNetwork, create_lycoris

    unet = tiny_unet()
    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet", "target_name": [],
                                 "target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]})
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=3, algo=algo, **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return unet, net


LYCORIS_CASES = {
    "locon": ("locon", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {"factor": 4}),
    "lokr-decomposed": ("lokr", {"factor": 8, "decompose_both": True, "use_tucker": True}),
}


@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_file_equals_lycoris_per_row(case, tmp_path, names):
    algo, kw = LYCORIS_CASES[case]
    unet, net = _lycoris(algo, seed=len(case), **kw)
    path = str(tmp_path / f"{case}.safetensors")
    net.save_weights(path, torch.float32, {})
    lf = read_lora(path, names)
    kinds = {v.kind for v in lf.variants.values()}
    assert kinds == ({"conv"} if algo == "locon" else {algo}), kinds
    if algo == "locon":
        assert lf.layers  # its linear layers go through the slot pools, its 3x3 convs through the variant path
    scales = [0.8, None, 1.0]
    got = served(lf, [[("a", s)] if s is not None else [] for s in scales])

    def set_mult(_, s):
        net.set_multiplier(0.0 if s is None else s)
        return contextlib.nullcontext()

    ref = reference_rows(unet, scales, set_mult)
    assert (got - ref).abs().max().item() <= TOL
    x, t, e = inputs(3)
    assert (ref[0] - reference_rows(unet, [None], set_mult, (x[:1], t[:1], e[:1]))[0]).abs().max().item() > 100 * TOL


def test_kohya_locon_equals_diffusers_kohya_conversion(tmp_path, names):
    """A kohya LoCon file (3x3 resnet convs, conv_shortcut, samplers, attention) loaded by
    diffusers' own kohya conversion (`lora_state_dict` + `load_lora_into_unet`)."""
    _, net = _lycoris("locon", seed=11)
    path = str(tmp_path / "locon.safetensors")
    net.save_weights(path, torch.float32, {})
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in load_file(path))
    ref_unet = tiny_unet()
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(path)
    StableDiffusionPipeline.load_lora_into_unet(state_dict, alphas, ref_unet, adapter_name="k")
    lf = read_lora(path, names)
    got = served(lf, [[("a", 1.0)], [], [("a", 0.5)]])
    x, t, e = inputs(3)
    ref = []
    for r, s in enumerate([1.0, 0.0, 0.5]):
        ref_unet.set_adapters(["k"], [s])
        with torch.no_grad():
            ref.append(ref_unet(x[r:r + 1], t[r:r + 1], e[r:r + 1]).sample)
    ref = torch.cat(ref)
    assert (got - ref).abs().max().item() <= TOL
    assert (ref[0] - ref[1]).abs().max().item() > 100 * TOL


def test_mixed_rows_plain_lora_and_every_variant(tmp_path, names):
    """One forward, rows naming different variants, two at once, and a plain LoRA: each row equals
    itself served alone (each adapter alone equals its tool, above)."""
    files = {}
    for case in ("conv-lora", "loha", "lokr", "dora"):  # the cheaper configs of each kind
        model = get_peft_model(tiny_unet(), PEFT_CASES[case])
        _randomize_peft(model, seed=3 + len(case))
        model.save_pretrained(tmp_path / case)
        files[case] = read_lora(tmp_path / case, names)
    plain = get_peft_model(tiny_unet(), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False))
    _randomize_peft(plain, seed=9)
    plain.save_pretrained(tmp_path / "plain")
    files["plain"] = read_lora(tmp_path / "plain", names)
    assert not files["plain"].variants
    rows = [[("loha", 1.0), ("plain", 0.7)], [("lokr", 0.5)], [], [("dora", 1.0)], [("conv-lora", 1.2), ("loha", 0.3)]]
    x, t, e = inputs(len(rows))
    got = served(None, rows, files)
    for r in (0, 3, 4):  # two adapters on a row, and DoRA (rescales the base output), equal themselves alone
        alone = served(None, [rows[r]], files, (x[r:r + 1], t[r:r + 1], e[r:r + 1]))[0]
        assert (got[r] - alone).abs().max().item() <= TOL, r


def test_shapes_are_checked_against_the_base(tmp_path, names):
    unet = tiny_unet()
    modules = dict(unet.named_modules())
    _, net = _lycoris("loha", seed=2)
    path = str(tmp_path / "loha.safetensors")
    net.save_weights(path, torch.float32, {})
    header = read_lora_header(path, names)
    for module, info in header.variants.items():
        check_shapes(path, module, info, weight_shape(modules[module]))
    module, info = next((m, i) for m, i in header.variants.items() if m.endswith("conv1"))
    other = next(m for m in modules if m.endswith("attn1.to_q"))
    with pytest.raises(AdapterShapeError, match="another base model") as e:
        check_shapes(path, module, info, weight_shape(modules[other]))
    assert info.keys["hada_w1_a"] in str(e.value)
    state = load_file(path)
    key = next(k for k in state if k.endswith("conv1.hada_w2_b"))
    state[key] = torch.zeros(4, 5)  # w2 no longer matches w1
    save_file(state, path)
    bad = read_lora_header(path, names).variants[module]
    with pytest.raises(AdapterShapeError, match=key):
        check_shapes(path, module, bad, weight_shape(modules[module]))
    state.pop(key)
    save_file(state, path)
    with pytest.raises(AdapterFormatError, match="LoHa module"):
        read_lora_header(path, names)


KQ = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def test_hostile_values_are_refused_naming_the_key(tmp_path, names):
    good = {f"{KQ}.hada_w1_a": torch.randn(64, 2), f"{KQ}.hada_w1_b": torch.randn(2, 64),
            f"{KQ}.hada_w2_a": torch.randn(64, 2), f"{KQ}.hada_w2_b": torch.randn(2, 64), f"{KQ}.alpha": torch.tensor(2.0)}
    path = tmp_path / "h.safetensors"
    save_file(good, path)
    layer = read_lora(path, names).variants["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert layer.kind == "loha" and layer.scale == 1.0 and layer.rank == 2
    from impasto.errors import AdapterValueError

    save_file(dict(good, **{f"{KQ}.hada_w2_b": torch.full((2, 64), float("nan"))}), path)
    read_lora_header(path, names)  # the header has no values to judge
    with pytest.raises(AdapterValueError, match="hada_w2_b"):
        read_lora(path, names)
    save_file(dict(good, **{f"{KQ}.alpha": torch.tensor(1e9)}), path)
    with pytest.raises(AdapterValueError, match="alpha"):
        read_lora_header(path, names)
    save_file(dict(good, **{f"{KQ}.hada_w1_a": torch.zeros(64, 2, dtype=torch.int32)}), path)
    with pytest.raises(AdapterValueError, match="floating point"):
        read_lora_header(path, names)
