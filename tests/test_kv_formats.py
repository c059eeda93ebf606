"""Custom Diffusion (kv family) files: every layout, written as its tool writes it, read back to the same deltas.

Ground truth is never typed in:
  * diffusers example: CustomDiffusionAttnProcessor2_0 on every attention layer of the tiny UNet
    (attn2 train_kv=True loaded from the UNet's weights as the training script does, attn1
    train_kv=False), K/V perturbed, then diffusers' own ``unet.save_attn_procs``; the truth is the
    processors' weights minus the base.
  * original repo: ``delta.bin`` from ``unet.named_parameters()`` of a fine-tuned UNet (its
    ``save_pretrained`` loop); the CompVis ``delta_epoch=*.ckpt`` with LDM names simulated from the
    UNet config block by block (an independent route from impasto's name formula), ``embed`` = the
    last n rows of a grown token table; ``compressed_delta`` as ``src/compress.py`` computes it.
CompVis LDM numbering is also checked against the SD 1.5 table of methods.md §0.
"""

import copy
import math
import os
import pathlib

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from impasto.adapters.kv import (
    KvFile,
    KvLayer,
    base_kv_weights,
    compress_kv_delta,
    compvis_name_map,
    energy_rank,
    kv_file_nbytes,
    merge_kv,
    read_kv,
    read_kv_header,
    write_kv,
)
from impasto.errors import AdapterFormatError, AdapterShapeError, AdapterUnsupportedError, AdapterValueError

WEIGHTS = "pytorch_custom_diffusion_weights"
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


# --- fixtures: the tiny base and a fine-tuned copy ----------------------------------------------------


@pytest.fixture(scope="module")
def unet(tiny_dir):
    return UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")


@pytest.fixture(scope="module")
def base(unet):
    return {k: (wk.clone(), wv.clone()) for k, (wk, wv) in base_kv_weights(unet).items()}


def custom_diffusion_unet(unet, seed=1, scale=0.05):
    """A UNet copy carrying CustomDiffusionAttnProcessor2_0 everywhere, as train_custom_diffusion.py sets them,
    with perturbed K/V; returns (unet, {attn2: (W_k', W_v')} read from the processors)."""
    u = copy.deepcopy(unet)
    torch.manual_seed(seed)
    procs = {}
    for name in u.attn_processors:
        attn = u.get_submodule(name.removesuffix(".processor"))
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False, hidden_size=attn.to_q.out_features)
            continue
        proc = CustomDiffusionAttnProcessor2_0(
            train_kv=True, train_q_out=False, hidden_size=attn.to_k.out_features, cross_attention_dim=attn.to_k.in_features
        )
        proc.load_state_dict({"to_k_custom_diffusion.weight": attn.to_k.weight, "to_v_custom_diffusion.weight": attn.to_v.weight})
        with torch.no_grad():
            for lin in (proc.to_k_custom_diffusion, proc.to_v_custom_diffusion):
                lin.weight.add_(scale * torch.randn_like(lin.weight))
        procs[name] = proc
    u.set_attn_processor(procs)
    truth = {
        n.removesuffix(".processor"): (p.to_k_custom_diffusion.weight.detach().clone(), p.to_v_custom_diffusion.weight.detach().clone())
        for n, p in u.attn_processors.items() if n.endswith("attn2.processor")
    }
    return u, truth


def finetuned_unet(unet, truth):
    """The same fine-tune as plain UNet weights (what the original repo trains in place)."""
    u = copy.deepcopy(unet)
    with torch.no_grad():
        for name, (wk, wv) in truth.items():
            attn = u.get_submodule(name)
            attn.to_k.weight.copy_(wk)
            attn.to_v.weight.copy_(wv)
    return u


def token(seed=7, dim=32):
    torch.manual_seed(seed)
    return torch.randn(dim)


# --- writers, each as its tool writes the file -----------------------------------------------------


def write_diffusers(folder, unet, *, safe=True, token_file="safetensors", seed=1):
    """save_attn_procs + the script's save_new_embed. token_file: 'safetensors' (<new1>.safetensors),
    'bin-safetensors' (the current script: safetensors bytes named <new1>.bin), 'pickle' (<new1>.bin)."""
    u, truth = custom_diffusion_unet(unet, seed=seed)
    os.makedirs(folder, exist_ok=True)
    u.save_attn_procs(folder, weight_name=f"{WEIGHTS}.{'safetensors' if safe else 'bin'}", safe_serialization=safe)
    tok = token()
    if token_file == "pickle":
        torch.save({"<new1>": tok}, os.path.join(folder, "<new1>.bin"))
    else:
        ext = "bin" if token_file == "bin-safetensors" else "safetensors"
        save_file({"<new1>": tok}, os.path.join(folder, f"<new1>.{ext}"), metadata={"format": "pt"})
    return truth, {"<new1>": tok}


def write_delta_bin(path, unet, truth, tokens):
    """src/diffusers_model_pipeline.py save_pretrained(freeze_model='crossattn_kv')."""
    u = finetuned_unet(unet, truth)
    delta = {"unet": {}, "modifier_token": dict(tokens)}
    for name, params in u.named_parameters():
        if "attn2.to_k" in name or "attn2.to_v" in name:
            delta["unet"][name] = params.detach().cpu().clone()
    torch.save(delta, path)


def ldm_attn2_names(config):
    """LDM attn2 prefixes in down -> mid -> up order, simulated block by block from a UNet config
    (conv_in is input_blocks.0; each resnet is one block, with its transformer at .1; each downsample
    one block; up levels have layers_per_block + 1 blocks, the upsample folded into the last)."""
    lpb = config["layers_per_block"]
    names, idx = [], 1
    for level, kind in enumerate(config["down_block_types"]):
        for _ in range(lpb):
            if kind.startswith("CrossAttn"):
                names.append(f"input_blocks.{idx}.1.transformer_blocks.0.attn2")
            idx += 1
        if level < len(config["down_block_types"]) - 1:
            idx += 1  # downsample block
    names.append("middle_block.1.transformer_blocks.0.attn2")
    idx = 0
    for kind in config["up_block_types"]:
        for _ in range(lpb + 1):
            if kind.startswith("CrossAttn"):
                names.append(f"output_blocks.{idx}.1.transformer_blocks.0.attn2")
            idx += 1
    return names


def spatial_order(names):
    """diffusers attn2 names in down -> mid -> up order (named_modules lists mid last)."""
    rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (rank[n.split(".")[0]], [int(x) for x in n.split(".") if x.isdigit()]))


def write_compvis(path, unet, truth, embeds):
    """src/get_deltas.py: attn2 to_k/to_v of the LDM state_dict + the last n token rows as 'embed'."""
    ldm = dict(zip(spatial_order(truth), ldm_attn2_names(dict(unet.config))))
    sd = {}
    for name, (wk, wv) in truth.items():
        sd[f"model.diffusion_model.{ldm[name]}.to_k.weight"] = wk.clone()
        sd[f"model.diffusion_model.{ldm[name]}.to_v.weight"] = wv.clone()
    table = torch.cat([torch.randn(10, embeds.shape[1]), embeds])  # the grown token table
    sd["embed"] = table[-embeds.shape[0]:].clone()
    torch.save({"state_dict": sd}, path)
    return ldm


def paper_rule(s, ratio=0.6):
    explain, all_ = 0, s.sum()
    for i, t in enumerate(s):
        explain += t / all_
        if explain > ratio:
            break
    return i


def write_compressed(path, delta_path, base, *, compvis=False, ldm=None):
    """src/compress.py (with --diffuser, or CompVis): u = U[:, :i] diag(s)[:i, :i], v = Vᵀ[:i]."""
    st = torch.load(delta_path, weights_only=True)
    top = "state_dict" if compvis else "unet"
    out = {top: {}}
    if compvis:
        out[top]["embed"] = st[top].pop("embed")
    elif "modifier_token" in st:
        out["modifier_token"] = st["modifier_token"]
    inv = {v: k for k, v in (ldm or {}).items()}
    truth = {}
    for name, w in st[top].items():
        proj = "to_k" if ".to_k." in name else "to_v"
        attn = name.removeprefix("model.diffusion_model.").rsplit(f".{proj}.", 1)[0]
        attn = inv.get(attn, attn)
        w0 = base[attn][0 if proj == "to_k" else 1]
        u, s, vt = torch.linalg.svd(w - w0)
        i = paper_rule(s)
        out[top][name] = {"u": (u[:, :i] @ torch.diag(s)[:i, :i]).clone(), "v": vt[:i].clone()}
        truth.setdefault(attn, {})[proj] = (out[top][name]["u"], out[top][name]["v"])
    torch.save(out, path)
    return truth


def assert_deltas(kf, truth, base, tol=0.0):
    assert set(kf.layers) == set(truth)
    for name, (wk, wv) in truth.items():
        for got, want, w0 in ((kf.layers[name].delta_k(), wk, base[name][0]), (kf.layers[name].delta_v(), wv, base[name][1])):
            diff = (got - (want - w0)).abs().max().item()
            assert diff <= tol, (name, diff)


# --- round trips ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "safe,token_file,open_as",
    [(True, "safetensors", "folder"), (True, "bin-safetensors", "file"), (False, "pickle", "folder"), (False, "pickle", "file")],
)
def test_diffusers_example_round_trip(tmp_path, unet, base, safe, token_file, open_as):
    truth, tokens = write_diffusers(tmp_path, unet, safe=safe, token_file=token_file)
    path = tmp_path if open_as == "folder" else tmp_path / f"{WEIGHTS}.{'safetensors' if safe else 'bin'}"
    kf = read_kv(path, base)
    assert kf.format == "diffusers" and not any(l.factored for l in kf.layers.values())
    assert_deltas(kf, truth, base)  # W' - W0 computed in fp32 both sides: exact
    assert kf.tokens.keys() == tokens.keys() and torch.equal(kf.tokens["<new1>"], tokens["<new1>"])
    h = read_kv_header(path, base)
    assert h.format == "diffusers" and h.placeholders == ["<new1>"] and h.token_dim == 32 and h.rank is None
    assert list(h.layers) == list(base)  # every attn2 layer, in the base's order
    assert h.nbytes == sum(2 * wk.numel() * 4 for wk, _ in base.values())  # full fp32 weights
    if not safe:  # the .bin holds the attn1 processors as empty dicts
        raw = torch.load(tmp_path / f"{WEIGHTS}.bin", weights_only=True)
        assert any(k.endswith("attn1.processor") and v == {} for k, v in raw.items())


def test_delta_bin_round_trip(tmp_path, unet, base):
    _, truth = custom_diffusion_unet(unet, seed=2)
    tok = {"<new1>": token(3)}
    write_delta_bin(tmp_path / "delta.bin", unet, truth, tok)
    for path in (tmp_path / "delta.bin", tmp_path):
        kf = read_kv(path, base)
        assert kf.format == "delta-bin"
        assert_deltas(kf, truth, base)
        assert torch.equal(kf.tokens["<new1>"], tok["<new1>"])


def test_compvis_round_trip(tmp_path, unet, base):
    _, truth = custom_diffusion_unet(unet, seed=3)
    embeds = torch.randn(2, 32)
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "delta_epoch=000004.ckpt"
    write_compvis(path, unet, truth, embeds)
    for p in (path, tmp_path):  # the log folder: its checkpoints/ holds the one delta file
        kf = read_kv(p, base)
        assert kf.format == "compvis"
        assert_deltas(kf, truth, base)
        assert list(kf.tokens) == ["<new1>", "<new2>"]
        assert torch.equal(kf.tokens["<new1>"], embeds[0]) and torch.equal(kf.tokens["<new2>"], embeds[1])
    assert read_kv_header(path, base).placeholders == ["<new1>", "<new2>"]


@pytest.mark.parametrize("compvis", [False, True])
def test_compressed_original_round_trip(tmp_path, unet, base, compvis):
    _, truth = custom_diffusion_unet(unet, seed=4)
    if compvis:
        ldm = write_compvis(tmp_path / "delta_epoch=000001.ckpt", unet, truth, torch.randn(1, 32))
        factors = write_compressed(tmp_path / "compressed_delta_epoch=000001.ckpt", tmp_path / "delta_epoch=000001.ckpt", base, compvis=True, ldm=ldm)
        path = tmp_path / "compressed_delta_epoch=000001.ckpt"
    else:
        write_delta_bin(tmp_path / "delta.bin", unet, truth, {"<new1>": token()})
        factors = write_compressed(tmp_path / "compressed_delta.bin", tmp_path / "delta.bin", base)
        path = tmp_path / "compressed_delta.bin"
    kf = read_kv(path, base)
    assert kf.format == "compressed" and all(l.factored for l in kf.layers.values())
    for name, f in factors.items():
        layer = kf.layers[name]
        assert torch.equal(layer.k_factors[0], f["to_k"][0]) and torch.equal(layer.k_factors[1], f["to_k"][1])
        assert torch.equal(layer.v_factors[0], f["to_v"][0]) and torch.equal(layer.v_factors[1], f["to_v"][1])
        assert layer.rank_k == f["to_k"][0].shape[1] > 0
    assert list(kf.tokens) == ["<new1>"]
    assert read_kv_header(path, base).rank == max(max(l.rank_k, l.rank_v) for l in kf.layers.values())


def test_kv_file_round_trip(tmp_path, unet, base):
    truth, tokens = write_diffusers(tmp_path / "d", unet)
    kf = read_kv(tmp_path / "d", base)
    comp, ranks = compress_kv_delta(kf, rank=5)
    assert all(r == (5, 5) for r in ranks.values())
    size = write_kv(tmp_path / "a.kv.safetensors", comp)
    back = read_kv(tmp_path / "a.kv.safetensors", base)
    assert back.format == "kv" and back.metadata["impasto.family"] == "kv" and back.metadata["impasto.rank"] == "5"
    for name, layer in comp.layers.items():  # stored fp16: equal to the fp16 rounding of the factors
        for a, b in zip(layer.k_factors + layer.v_factors, back.layers[name].k_factors + back.layers[name].v_factors):
            assert torch.equal(a.half().float(), b)
    assert torch.equal(back.tokens["<new1>"], tokens["<new1>"])  # tokens stay fp32
    with safe_open(tmp_path / "a.kv.safetensors", "pt") as f:
        name = next(iter(base))
        assert f.get_slice(f"{name}.to_k.u").get_dtype() == "F16" and f.get_slice("token.<new1>").get_dtype() == "F32"
    assert size == os.path.getsize(tmp_path / "a.kv.safetensors")


def test_header_reads_no_tensor_data(tmp_path, unet, base, monkeypatch):
    write_diffusers(tmp_path, unet)
    from impasto.adapters import files  # the one file layer every reader opens through

    real = files.safe_open

    class NoData:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def __getattr__(self, name):
            if name == "get_tensor":
                raise AssertionError("header read tensor data")
            return getattr(self.f, name)

    monkeypatch.setattr(files, "safe_open", NoData)
    h = read_kv_header(tmp_path, base)
    assert len(h.layers) == 7 and h.placeholders == ["<new1>"]
    with pytest.raises(AssertionError, match="header read tensor data"):  # the guard can fire
        read_kv(tmp_path, base)


# --- CompVis names --------------------------------------------------------------------------------------


def meta_unet(**config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def test_compvis_names_sd15_table():
    """methods.md §0: diffusers module <-> LDM name for SD 1.5."""
    table = {
        "down_blocks.0.attentions.{0,1}": "input_blocks.{1,2}.1", "down_blocks.1.attentions.{0,1}": "input_blocks.{4,5}.1",
        "down_blocks.2.attentions.{0,1}": "input_blocks.{7,8}.1", "up_blocks.1.attentions.{0,1,2}": "output_blocks.{3,4,5}.1",
        "up_blocks.2.attentions.{0,1,2}": "output_blocks.{6,7,8}.1", "up_blocks.3.attentions.{0,1,2}": "output_blocks.{9,10,11}.1",
        "mid_block.attentions.{0}": "middle_block.{1}",
    }
    want = {}
    for diff, ldm in table.items():
        d0, dj = diff.split("{")
        l0, lj = ldm.split("{")
        lj, l1 = lj.split("}")
        for j, l in zip(dj.rstrip("}").split(","), lj.split(",")):
            want[f"{l0}{l}{l1}.transformer_blocks.0.attn2"] = f"{d0}{j}.transformer_blocks.0.attn2"
    base = base_kv_weights(meta_unet(**SD15_UNET))
    assert compvis_name_map(base) == want and len(want) == 16
    assert sum(wk.shape[0] for wk, _ in base.values()) == 12480


@pytest.mark.parametrize(
    "config",
    [
        dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
             up_block_types=("CrossAttnUpBlock2D",) * 2),  # the tiny layout
        dict(block_out_channels=(32, 32, 64), layers_per_block=2,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),  # 3 levels, SDXL-like first block
    ],
    ids=["tiny", "three-levels"],
)
def test_compvis_names_follow_block_layout(config):
    cfg = dict(config, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16, sample_size=16)
    base = base_kv_weights(meta_unet(**cfg))
    want = dict(zip(ldm_attn2_names(cfg), spatial_order(base)))
    assert len(want) == len(base) and compvis_name_map(base) == want


def test_compvis_other_block_count_reads(tmp_path):
    """A CompVis file written for a 3-level UNet reads on it (different block count from the tiny one)."""
    cfg = dict(block_out_channels=(32, 32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=8,
               norm_num_groups=16, sample_size=16, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
               up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",))
    torch.manual_seed(0)
    u = UNet2DConditionModel(**cfg)
    base = base_kv_weights(u)
    truth = {n: (wk + 0.1 * torch.randn_like(wk), wv + 0.1 * torch.randn_like(wv)) for n, (wk, wv) in base.items()}
    write_compvis(tmp_path / "delta_epoch=000000.ckpt", u, truth, torch.randn(1, 32))
    assert_deltas(read_kv(tmp_path / "delta_epoch=000000.ckpt", base), truth, base)


# --- compression -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s,energy,rank",
    [
        ([4, 2, 1, 1], 0.75, 2),  # shares 0.5, 0.75 (= energy: no stop, strict ">"), 0.875 -> break at 2, keep [:2]
        ([4, 2, 1, 1], 0.7, 1),  # 0.75 > 0.7 at index 1 -> keep [:1]
        ([4, 2, 1, 1], 0.5, 1),  # 0.5 = energy at index 0 does not stop; 0.75 at index 1 does
        ([4, 2, 1, 1], 0.4, 0),  # the first value alone exceeds: rank 0, as the original loop gives
        ([8, 4, 2, 1, 1], 0.6, 1),  # 0.5, 0.75 -> 1
    ],
)
def test_energy_rank_rule(s, energy, rank):
    s = torch.tensor(s, dtype=torch.float64)
    assert energy_rank(s, energy) == rank == paper_rule(s, energy)


def spectrum_delta(s, h=40, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(h, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def test_compress_picks_rule_rank_and_fixed_rank_error_is_svd_tail():
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.125]  # sum 16: shares 0.5, 0.75 -> rank 1 at 0.6
    delta = spectrum_delta(s).float()
    kf = KvFile(path="x", format="delta-bin", layers={"a.attn2": KvLayer(dk=delta, dv=2 * delta)}, tokens={})
    comp, ranks = compress_kv_delta(kf)
    assert ranks == {"a.attn2": (1, 1)} and comp.metadata["impasto.energy"] == "0.6"
    comp, ranks = compress_kv_delta(kf, energy=0.75)  # 0.75 exactly at index 1: strict, keep 2
    assert ranks == {"a.attn2": (2, 2)} and not comp.notes
    comp, ranks = compress_kv_delta(kf, energy=0.4)  # s_0 holds 0.5 > 0.4: the rule keeps nothing, and says so
    assert ranks == {"a.attn2": (0, 0)} and "rank 0 for 2 of 2" in comp.notes[0]
    assert torch.equal(comp.layers["a.attn2"].delta_k(), torch.zeros_like(delta))
    for r in (1, 3, 5):
        comp, _ = compress_kv_delta(kf, rank=r)
        layer = comp.layers["a.attn2"]
        err = (layer.delta_k().double() - delta.double()).pow(2).sum().item()
        tail = sum(x * x for x in s[r:])
        assert err == pytest.approx(tail, rel=1e-4, abs=1e-8)
        assert (layer.delta_v().double() - 2 * delta.double()).pow(2).sum().item() == pytest.approx(4 * tail, rel=1e-4, abs=1e-8)


def test_size_sd15_shapes(tmp_path):
    """A rank-r kv file over SD 1.5's 16 attn2 layers holds exactly 99,072·r tensor bytes at fp16."""
    base = base_kv_weights(meta_unet(**SD15_UNET))  # shapes only
    r = 3
    g = torch.Generator().manual_seed(0)
    layers = {
        n: KvLayer(k_factors=(torch.randn(wk.shape[0], r, generator=g), torch.randn(r, 768, generator=g)),
                   v_factors=(torch.randn(wk.shape[0], r, generator=g), torch.randn(r, 768, generator=g)))
        for n, (wk, _) in base.items()
    }
    kf = KvFile(path="", format="kv", layers=layers, tokens={"<new1>": torch.randn(768, generator=g)})
    size = write_kv(tmp_path / "sd15.safetensors", kf)
    assert kv_file_nbytes([tuple(wk.shape) for wk, _ in base.values()], r) == 99_072 * r
    h = read_kv_header(tmp_path / "sd15.safetensors", base)
    assert h.nbytes == 99_072 * r and h.rank == r and h.token_dim == 768
    header_bytes = size - 99_072 * r - 768 * 4
    assert 0 < header_bytes < 8192, header_bytes
    assert kv_file_nbytes([tuple(wk.shape) for wk, _ in base.values()], 50) == 4_953_600  # ≈ 5 MB at r = 50


# --- merge ------------------------------------------------------------------------------------------------


CAPTIONS = [
    "photo of a dog running on the beach", "a red car parked near a house", "a bowl of fruit on a wooden table",
    "photo of a cat sleeping on a sofa", "mountains under a cloudy sky at sunset", "a man riding a bicycle in the city",
    "two birds sitting on a branch", "a painting of a river with boats", "a child playing with a ball in the park",
    "an old castle on a green hill", "a cup of coffee next to a laptop", "a yellow flower in a garden",
    "a group of people walking in the snow", "a plate of pasta with tomato sauce",
]


class ReferenceFeatures:
    """Features with the tokens really added (tokenizer.add_tokens + resized embedding table), on copies."""

    def __init__(self, tokenizer, text_encoder, tokens):
        self.tok, self.te = copy.deepcopy(tokenizer), copy.deepcopy(text_encoder)
        self.tok.add_tokens(list(tokens))
        self.te.resize_token_embeddings(len(self.tok))
        with torch.no_grad():
            for t, v in tokens.items():
                self.te.get_input_embeddings().weight[self.tok.convert_tokens_to_ids(t)] = v

    def __call__(self, texts):
        rows = []
        with torch.no_grad():
            for text in texts:
                ids = self.tok(text, padding="do_not_pad").input_ids
                hidden = self.te(torch.tensor([ids]))[0][0].double()
                rows.append(hidden[4:] if text.startswith("photo of a") else hidden[1:])
        return torch.cat(rows)


def test_merge_closed_form(tmp_path, tiny_dir, unet, base):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder").eval()
    ln = next(m for n, m in text_encoder.named_modules() if n.endswith("final_layer_norm"))
    with torch.no_grad():  # final LayerNorm with bias 0 and gain 1 (a fresh init): every feature row sums to 0
        ln.bias.zero_()
        ln.weight.fill_(1.0)
    with pytest.raises(AdapterValueError, match="singular"):
        merge_kv([KvFile("x", "kv", {}, {})], CAPTIONS, categories=["dog"], tokenizer=tokenizer, text_encoder=text_encoder, base=base)
    torch.manual_seed(5)
    with torch.no_grad():  # a trained CLIP's final LayerNorm has a bias and gains: features span all of R^D
        ln.bias.normal_(0, 0.5)
        ln.weight.uniform_(0.5, 1.5)
    files = []
    for seed, folder in ((11, "a"), (12, "b")):
        write_diffusers(tmp_path / folder, unet, seed=seed)
        kf = read_kv(tmp_path / folder, base)
        kf.tokens = {"<new1>": token(seed)}  # both trained as <new1>, as the diffusers script names them
        files.append(kf)
    n_vocab = len(tokenizer)
    merged = merge_kv(files, CAPTIONS, categories=["dog", "cat"], tokenizer=tokenizer, text_encoder=text_encoder, base=base)
    assert len(tokenizer) == n_vocab  # the caller's tokenizer is untouched
    assert list(merged.tokens) == ["<new1>", "<new2>"] and torch.equal(merged.tokens["<new2>"], files[1].tokens["<new1>"])

    features = ReferenceFeatures(tokenizer, text_encoder, merged.tokens)
    c_reg = features(CAPTIONS)
    assert c_reg.shape[0] >= 32
    targets = [features([f"{t} {c}", f"photo of a {t} {c}"])
               for t, c in (("<new1>", "dog"), ("<new2>", "cat"))]
    for name, (wk0, wv0) in base.items():
        for i, (w0, get) in enumerate(((wk0, KvLayer.delta_k), (wv0, KvLayer.delta_v))):
            w0 = w0.double()
            w_hat = w0 + get(merged.layers[name]).double()
            for k, c in enumerate(targets):  # constraint: each concept's targets map as its own fine-tune does
                want = (w0 + get(files[k].layers[name]).double()) @ c.T
                assert torch.allclose(w_hat @ c.T, want, atol=1e-4), (name, i, k, (w_hat @ c.T - want).abs().max())
            naive = w0 + get(files[0].layers[name]).double() + get(files[1].layers[name]).double()
            reg_merged = ((w_hat - w0) @ c_reg.T).norm()
            reg_naive = ((naive - w0) @ c_reg.T).norm()
            assert reg_merged < reg_naive, (name, reg_merged, reg_naive)
            # it is THE minimizer: the KKT system of min ‖(W-W0)C_regᵀ‖ s.t. W Cᵀ = Vᵀ gives the same W
            C = torch.cat(targets)
            V = torch.cat([(w0 + get(files[k].layers[name]).double()) @ c.T for k, c in enumerate(targets)], 1)
            D, T = C.shape[1], C.shape[0]
            kkt = torch.zeros(D + T, D + T, dtype=torch.float64)
            kkt[:D, :D], kkt[:D, D:], kkt[D:, :D] = c_reg.T @ c_reg, C.T, C
            rhs = torch.cat([(w0 @ c_reg.T @ c_reg).T, V.T])
            w_kkt = torch.linalg.solve(kkt, rhs)[:D].T
            assert torch.allclose(w_hat, w_kkt, atol=1e-4), (name, (w_hat - w_kkt).abs().max())


# --- refusals ---------------------------------------------------------------------------------------------


class _Payload:
    """Pickles to a call that writes `marker` when unpickled by an unrestricted unpickler."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "executed"))


@pytest.mark.parametrize("name", ["delta.bin", "delta_epoch=000001.ckpt", "<new1>.bin"])
def test_malicious_pickle_never_executed(tmp_path, unet, base, name):
    marker, proof = tmp_path / "marker", tmp_path / "proof"
    evil = lambda m: {"unet": {"x.attn2.to_k.weight": _Payload(m)}} if name != "<new1>.bin" else {"<new1>": _Payload(m)}
    torch.save(evil(proof), tmp_path / "proof.pkl")
    torch.load(tmp_path / "proof.pkl", weights_only=False)  # the payload is live: an unrestricted load runs it
    assert proof.exists()
    folder = tmp_path / "out"
    if name == "<new1>.bin":  # a diffusers output folder whose token file is the payload
        write_diffusers(folder, unet, token_file="safetensors")
        os.remove(folder / "<new1>.safetensors")
    folder.mkdir(exist_ok=True)
    torch.save(evil(marker), folder / name)
    target = folder if name == "<new1>.bin" else folder / name
    for read in (read_kv_header, read_kv):
        with pytest.raises(AdapterFormatError, match="nothing executed") as info:
            read(target, base)
        assert name in str(info.value)
    assert not marker.exists()


def _diffusers_file(tmp_path, unet):
    write_diffusers(tmp_path, unet)
    return tmp_path / f"{WEIGHTS}.safetensors"


def _edit(path, fn):
    state = load_file(path)
    fn(state)
    save_file(state, path)
    return path


L0 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
KEY = f"{L0}.processor.to_v_custom_diffusion.weight"


def case_truncated(tmp_path, unet, base):
    path = _diffusers_file(tmp_path, unet)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path, AdapterFormatError, "safetensors", path.name


def case_truncated_bin(tmp_path, unet, base):
    _, truth = custom_diffusion_unet(unet)
    write_delta_bin(tmp_path / "delta.bin", unet, truth, {"<new1>": token()})
    data = (tmp_path / "delta.bin").read_bytes()
    (tmp_path / "delta.bin").write_bytes(data[: len(data) // 2])
    return tmp_path / "delta.bin", AdapterFormatError, "weights-only", "delta.bin"


def case_missing_key(tmp_path, unet, base):
    return _edit(_diffusers_file(tmp_path, unet), lambda s: s.pop(KEY)), AdapterFormatError, "no to_v", L0


def case_wrong_shape(tmp_path, unet, base):
    path = _edit(_diffusers_file(tmp_path, unet), lambda s: s.update({KEY: torch.zeros(64, 16)}))
    return path, AdapterShapeError, "shape", L0


def case_unknown_key(tmp_path, unet, base):
    key = f"{L0}.processor.to_k_custom_diffusion.bias"
    return _edit(_diffusers_file(tmp_path, unet), lambda s: s.update({key: torch.zeros(64)})), AdapterFormatError, "unknown key", key


def case_q_without_out(tmp_path, unet, base):
    key = f"{L0}.processor.to_q_custom_diffusion.weight"
    return _edit(_diffusers_file(tmp_path, unet), lambda s: s.update({key: torch.zeros(64, 64)})), AdapterFormatError, "no to_out", key


def _with_q_out(state, unet):
    """Add train_q_out=True weights (to_q, to_out.0 weight and bias, each the base's + 0.01) to L0."""
    attn = unet.get_submodule(L0)
    pre = f"{L0}.processor."
    state.update({pre + "to_q_custom_diffusion.weight": attn.to_q.weight.detach() + 0.01,
                  pre + "to_out_custom_diffusion.0.weight": attn.to_out[0].weight.detach() + 0.01,
                  pre + "to_out_custom_diffusion.0.bias": attn.to_out[0].bias.detach() + 0.01})


def case_q_out_without_base(tmp_path, unet, base):
    # read_kv(path, base) without qout_base: the Q/out weights cannot be checked or served
    path = _edit(_diffusers_file(tmp_path, unet), lambda s: _with_q_out(s, unet))
    return path, AdapterUnsupportedError, "qout_base", f"{L0}.processor.to_q_custom_diffusion.weight"


def case_q_out_original_repo(tmp_path, unet, base):
    _, truth = custom_diffusion_unet(unet)
    write_delta_bin(tmp_path / "delta.bin", unet, truth, {"<new1>": token()})
    sd = torch.load(tmp_path / "delta.bin", weights_only=True)
    sd["unet"][f"{L0}.to_q.weight"] = torch.zeros(64, 64)
    torch.save(sd, tmp_path / "delta.bin")
    return tmp_path / "delta.bin", AdapterUnsupportedError, "diffusers' layout only", f"{L0}.to_q.weight"


def test_q_out_deltas_are_exact(tmp_path, unet, base):
    from impasto.adapters.kv import base_qout_weights

    path = _edit(_diffusers_file(tmp_path, unet), lambda s: _with_q_out(s, unet))
    qbase = base_qout_weights(unet)
    h = read_kv_header(path, base, qbase)
    assert list(h.qout) == [L0] and set(h.qout[L0]) == {"q", "out", "out_bias"}
    kf = read_kv(path, base, qbase)
    q = kf.qout[L0]
    for d in (q.dq, q.dout, q.dbias):
        assert torch.allclose(d, torch.full_like(d, 0.01), atol=1e-6)
    assert len(kf.layers) == 7  # K/V read as before
    with pytest.raises(AdapterShapeError, match="to_out.0 bias"):
        read_kv_header(_edit(path, lambda s: s.update({f"{L0}.processor.to_out_custom_diffusion.0.bias": torch.zeros(3)})),
                       base, qbase)


def case_other_base(tmp_path, unet, base):
    key = "down_blocks.7.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
    path = _edit(_diffusers_file(tmp_path, unet), lambda s: s.update({key: torch.zeros(64, 32), key.replace("to_k", "to_v"): torch.zeros(64, 32)}))
    return path, AdapterShapeError, "another base model", "down_blocks.7"


def case_token_wrong_dim(tmp_path, unet, base):
    write_diffusers(tmp_path, unet)
    save_file({"<new1>": torch.zeros(768)}, tmp_path / "<new1>.safetensors")
    return tmp_path, AdapterShapeError, "D_emb", "<new1>"


def case_sdxl_tokens(tmp_path, unet, base):
    _, truth = custom_diffusion_unet(unet)
    write_delta_bin(tmp_path / "delta.bin", unet, truth, {"<new1>": [token(), token(8)]})
    return tmp_path / "delta.bin", AdapterUnsupportedError, "SDXL", "<new1>"


def case_missing(tmp_path, unet, base):
    return tmp_path / "nope.bin", AdapterFormatError, "no such file", "nope.bin"


REFUSALS = [case_truncated, case_truncated_bin, case_missing_key, case_wrong_shape, case_unknown_key, case_q_without_out,
            case_q_out_without_base, case_q_out_original_repo, case_other_base, case_token_wrong_dim, case_sdxl_tokens, case_missing]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.__name__.removeprefix("case_") for c in REFUSALS])
def test_refusals(tmp_path, unet, base, case):
    path, error, what, key = case(tmp_path, unet, base)
    for read in (read_kv_header, read_kv):
        with pytest.raises(error, match=what) as info:
            read(path, base)
        assert key in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_refused_at_full_read_only(tmp_path, unet, base, bad):
    path = _edit(_diffusers_file(tmp_path, unet), lambda s: s[KEY].view(-1).__setitem__(5, bad))
    assert len(read_kv_header(path, base).layers) == 7  # the header read does not look at values
    with pytest.raises(AdapterValueError, match="NaN" if math.isnan(bad) else "Inf") as info:
        read_kv(path, base)
    assert KEY in str(info.value)
