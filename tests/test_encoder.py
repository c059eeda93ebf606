"""The `encoder` family: IP-Adapter files (base and Plus) served through the conditioning plan,
equal to diffusers' `load_ip_adapter` + `ip_adapter_image=` + `set_ip_adapter_scale`.

The fixtures are written in the ecosystem's own layouts, by this file (not by impasto): the
flat prefixed `.safetensors` and the nested `{"image_proj", "ip_adapter"}` torch pickle, with
random weights, beside a random local CLIPVisionModelWithProjection folder.
"""

import io
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import impasto
from impasto.adapters import encoder as encoder_format
from impasto.adapters.families import encoder as encoder_family
from test_generate import generate_counting_rows

TOL = 1e-3
STEPS = 4
VISION = dict(hidden_size=32, intermediate_size=48, projection_dim=24, num_hidden_layers=2, num_attention_heads=2,
              image_size=32, patch_size=8)


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def write_encoder(folder, seed=0, **overrides):
    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**VISION, **overrides})).save_pretrained(folder)
    return folder


def ip_layers(unet, width, seed):
    """ip_adapter.<id>.to_{k,v}_ip.weight for every cross-attention processor, ids 1, 3, ... as
    the original repo numbers `unet.attn_processors` (attn1 and attn2 alternate)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key_id, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            for which, lin in (("k", attn.to_k), ("v", attn.to_v)):
                out[f"{key_id}.to_{which}_ip.weight"] = 0.5 * torch.randn(lin.out_features, width, generator=g)
    return out


def base_proj(width, embed, seed, tokens=4):
    g = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(tokens * width, embed, generator=g) / embed**0.5,
            "proj.bias": 0.1 * torch.randn(tokens * width, generator=g),
            "norm.weight": 1 + 0.1 * torch.randn(width, generator=g), "norm.bias": 0.1 * torch.randn(width, generator=g)}


def plus_proj(width, embed, seed, W=48, heads=2, depth=4, tokens=16):
    """The original Resampler's state dict (resampler.py key names)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inner = heads * 64
    p = {"latents": r(1, tokens, W) / W**0.5, "proj_in.weight": r(W, embed) / embed**0.5, "proj_in.bias": 0.1 * r(W),
         "proj_out.weight": r(width, W) / W**0.5, "proj_out.bias": 0.1 * r(width),
         "norm_out.weight": 1 + 0.1 * r(width), "norm_out.bias": 0.1 * r(width)}
    for i in range(depth):
        for n in ("0.norm1", "0.norm2", "1.0"):
            p[f"layers.{i}.{n}.weight"] = 1 + 0.1 * r(W)
            p[f"layers.{i}.{n}.bias"] = 0.1 * r(W)
        p[f"layers.{i}.0.to_q.weight"] = r(inner, W) / W**0.5
        p[f"layers.{i}.0.to_kv.weight"] = r(2 * inner, W) / W**0.5
        p[f"layers.{i}.0.to_out.weight"] = r(W, inner) / inner**0.5
        p[f"layers.{i}.1.1.weight"] = r(4 * W, W) / W**0.5
        p[f"layers.{i}.1.3.weight"] = r(W, 4 * W) / (4 * W) ** 0.5
    return p


def save_safetensors(path, proj, ip):
    save_file({**{f"image_proj.{k}": v for k, v in proj.items()}, **{f"ip_adapter.{k}": v for k, v in ip.items()}},
              path)
    return path


def save_bin(path, proj, ip):
    torch.save({"image_proj": proj, "ip_adapter": ip}, path)
    return path


def images(seed, n=1, size=(40, 36)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def ip_dir(tiny_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    d = str(tmp_path_factory.mktemp("ip"))
    write_encoder(os.path.join(d, "image_encoder"))
    D = unet.config.cross_attention_dim
    save_safetensors(os.path.join(d, "base.safetensors"), base_proj(D, VISION["projection_dim"], 1), ip_layers(unet, D, 2))
    save_bin(os.path.join(d, "plus.bin"), plus_proj(D, VISION["hidden_size"], 3), ip_layers(unet, D, 4))
    return d


@pytest.fixture(scope="module")
def ip_engine(tiny_dir, ip_dir):
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    enc = os.path.join(ip_dir, "image_encoder")
    eng.adapters.register("ip", os.path.join(ip_dir, "base.safetensors"), image_encoder=enc)
    eng.adapters.register("ip-plus", os.path.join(ip_dir, "plus.bin"), image_encoder=enc)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def pipes(tiny_dir, ip_dir):
    """diffusers pipelines with each IP-Adapter loaded by `load_ip_adapter` (the reference)."""
    out = {}
    for name, weight in (("ip", "base.safetensors"), ("ip-plus", "plus.bin")):
        p = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
        p.set_progress_bar_config(disable=True)
        p.load_ip_adapter(ip_dir, subfolder="", weight_name=weight, image_encoder_folder="image_encoder",
                          local_files_only=True)
        out[name] = p
    return out


def reference(pipes, name, prompt, image, scale, seed, **kw):
    p = pipes[name]
    p.set_ip_adapter_scale(scale)
    return p(prompt, ip_adapter_image=image, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
             output_type="np", **kw).images


def test_files_read_by_detection(ip_engine):
    base, plus = ip_engine.adapters.info("ip"), ip_engine.adapters.info("ip-plus")
    assert (base.family, base.format, base.image_tokens) == ("encoder", "ip-adapter", 4)
    assert (plus.family, plus.format, plus.image_tokens) == ("encoder", "ip-adapter-plus", 16)
    assert len(base.targets) == len(ip_engine.attn2)


@pytest.mark.parametrize("name", ["ip", "ip-plus"])
def test_equals_diffusers(ip_engine, pipes, name):
    img = images(10)[0]
    out = ip_engine.generate("a red star", adapters=[(name, 0.6)], ip_adapter_image=img, steps=STEPS, seed=5,
                             negative_prompt="blue", output_type="np")
    ref = reference(pipes, name, "a red star", img, 0.6, 5, negative_prompt="blue")
    assert _diff(out.images, ref) <= TOL
    # the comparison can fail: without the image branch the picture is another one
    plain = ip_engine.generate("a red star", steps=STEPS, seed=5, negative_prompt="blue", output_type="np")
    assert _diff(out.images, plain.images) > 30 * TOL


def test_several_images_concatenate_tokens(ip_engine, pipes):
    imgs = images(11, n=2)
    out = ip_engine.generate("a blue square", adapters=[("ip-plus", 0.8)], ip_adapter_image=imgs, steps=STEPS,
                             seed=3, output_type="np")
    ref = reference(pipes, "ip-plus", "a blue square", [imgs], 0.8, 3)  # diffusers: a list per adapter
    assert _diff(out.images, ref) <= TOL
    one = ip_engine.generate("a blue square", adapters=[("ip-plus", 0.8)], ip_adapter_image=imgs[0], steps=STEPS,
                             seed=3, output_type="np")
    assert _diff(out.images, one.images) > 30 * TOL


def test_no_cfg_and_num_images_equal_diffusers(ip_engine, pipes):
    img = images(12)[0]
    out = ip_engine.generate("a green circle", adapters=[("ip", 1.0)], ip_adapter_image=img, steps=STEPS, seed=8,
                             guidance=1.0, num_images=2, output_type="np")
    ref = reference(pipes, "ip", "a green circle", img, 1.0, 8, guidance_scale=1.0, num_images_per_prompt=2)
    assert _diff(out.images, ref) <= TOL


def test_mixed_batch_one_forward_equals_diffusers(ip_engine, pipes, pipe):
    a, b = images(20)[0], images(21)[0]
    reqs = [
        impasto.Request("a red star", adapters=[("ip", 0.7)], ip_adapter_image=a, steps=STEPS, seed=1, output_type="np"),
        impasto.Request("a red star", seed=1, steps=STEPS, output_type="np"),
        impasto.Request("a yellow heart", adapters=[("ip-plus", 0.4)], ip_adapter_image=b, steps=STEPS, seed=2,
                        negative_prompt="dark", output_type="np"),
        impasto.Request("a red star", adapters=[("ip", 0.3)], ip_adapter_image=b, steps=STEPS, seed=1,
                        guidance=1.0, output_type="np"),
    ]
    outs, calls = generate_counting_rows(ip_engine, reqs)
    assert [o.error for o in outs] == [None] * 4
    assert calls == [2 + 2 + 2 + 1] * STEPS  # rows with and without image tokens share each forward
    refs = [
        reference(pipes, "ip", "a red star", a, 0.7, 1),
        pipe("a red star", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), output_type="np").images,
        reference(pipes, "ip-plus", "a yellow heart", b, 0.4, 2, negative_prompt="dark"),
        reference(pipes, "ip", "a red star", b, 0.3, 1, guidance_scale=1.0),
    ]
    for out, ref in zip(outs, refs):
        assert _diff(out.images, ref) <= TOL


def _counting(monkeypatch, eng, name):
    """Counters of the image encoder's forwards, projections and K'/V' projections."""
    counts = {"encoder": 0, "project": 0, "image_kv": 0}
    folder = eng.adapters.info(name).image_encoder
    model, _ = encoder_family.image_encoder(eng.adapters, folder)
    handle = model.register_forward_hook(lambda *a: counts.__setitem__("encoder", counts["encoder"] + 1))
    for fn in ("project", "image_kv"):
        orig = getattr(encoder_format, fn)

        def wrapped(*a, _orig=orig, _fn=fn, **k):
            counts[_fn] += 1
            return _orig(*a, **k)

        monkeypatch.setattr(encoder_format, fn, wrapped)
    return counts, handle


@pytest.mark.parametrize("name,encoder_runs", [("ip", 1), ("ip-plus", 1)])
def test_image_branch_planned_once_per_request(ip_engine, monkeypatch, name, encoder_runs):
    img = images(30)[0]
    layers = len(ip_engine.attn2)
    for steps in (2, 5):
        counts, handle = _counting(monkeypatch, ip_engine, name)
        try:
            # two requests with the same image: planned together, their branches shared
            reqs = [impasto.Request(p, adapters=[(name, 0.5)], ip_adapter_image=img, steps=steps, seed=0)
                    for p in ("a star", "a circle")]
            outs = ip_engine.generate_batch(reqs)
        finally:
            handle.remove()
            monkeypatch.undo()
        assert [o.error for o in outs] == [None, None]
        # the encoder once (Plus: image and zero image in one forward; base: the zero embedding
        # needs none), the projection once per kind (image, unconditional), K'/V' once per layer
        # and kind: independent of the number of steps
        assert counts == {"encoder": encoder_runs, "project": 2, "image_kv": 2 * layers}, (steps, counts)


def test_scale_zero_is_the_base_model(ip_engine):
    img = images(40)[0]
    zero = ip_engine.generate("a red star", adapters=[("ip", 0.0)], ip_adapter_image=img, steps=STEPS, seed=4,
                              output_type="np")
    plain = ip_engine.generate("a red star", steps=STEPS, seed=4, output_type="np")
    assert _diff(zero.images, plain.images) == 0.0  # λ = 0: exactly the base model


def test_composes_with_lora_equal_to_diffusers_peft(tiny_dir, ip_dir, ip_engine, tmp_path):
    """IP-Adapter and a LoRA on q/k/v/out (attn2's K/V LoRA folded into the plan) on one
    request, against diffusers with the LoRA through PEFT and the IP-Adapter loaded after it."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="l")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="l")))
    ip_engine.adapters.register("l", str(tmp_path / "pytorch_lora_weights.safetensors"))
    p = StableDiffusionPipeline.from_pretrained(tiny_dir, unet=unet, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    p.load_ip_adapter(ip_dir, subfolder="", weight_name="plus.bin", image_encoder_folder="image_encoder",
                      local_files_only=True)
    img = images(41)[0]
    try:
        out = ip_engine.generate("a red star", adapters=[("l", 0.8), ("ip-plus", 0.6)], ip_adapter_image=img,
                                 steps=STEPS, seed=9, output_type="np")
        lora_only = ip_engine.generate("a red star", adapters=[("l", 0.8)], steps=STEPS, seed=9, output_type="np")
    finally:
        ip_engine.adapters.unregister("l")
    p.unet.set_adapters(["l"], [0.8])
    p.set_ip_adapter_scale(0.6)
    ref = p("a red star", ip_adapter_image=img, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(9),
            output_type="np").images
    assert _diff(out.images, ref) <= TOL
    assert _diff(out.images, lora_only.images) > 30 * TOL


def test_composes_with_custom_diffusion_equal_to_diffusers(tiny_dir, ip_dir, ip_engine, tmp_path):
    """IP-Adapter and a Custom Diffusion (`kv`) adapter with its token on one request, against
    diffusers with the fine-tune's K/V weights in place of attn2's to_k / to_v (what the Custom
    Diffusion processor computes), the token through load_textual_inversion, then load_ip_adapter."""
    from diffusers import UNet2DConditionModel
    from test_kv_serving import custom_diffusion

    folder = str(tmp_path / "cd")
    cd_unet = custom_diffusion(tiny_dir, folder, seed=5)
    ip_engine.adapters.register("cd", folder)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    with torch.no_grad():
        for name, proc in cd_unet.attn_processors.items():
            if name.endswith("attn2.processor"):
                attn = unet.get_submodule(name.removesuffix(".processor"))
                attn.to_k.weight.copy_(proc.to_k_custom_diffusion.weight)
                attn.to_v.weight.copy_(proc.to_v_custom_diffusion.weight)
    p = StableDiffusionPipeline.from_pretrained(tiny_dir, unet=unet, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    p.load_textual_inversion(os.path.join(folder, "<new1>.safetensors"), token="<new1>")
    p.load_ip_adapter(ip_dir, subfolder="", weight_name="base.safetensors", image_encoder_folder="image_encoder",
                      local_files_only=True)
    p.set_ip_adapter_scale(0.8)
    img = images(43)[0]
    try:
        out = ip_engine.generate("a photo of a <new1> dog", adapters=["cd", ("ip", 0.8)], ip_adapter_image=img,
                                 steps=STEPS, seed=6, output_type="np")
        kv_only = ip_engine.generate("a photo of a <new1> dog", adapters=["cd"], steps=STEPS, seed=6, output_type="np")
    finally:
        ip_engine.adapters.unregister("cd")
    ref = p("a photo of a <new1> dog", ip_adapter_image=img, num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(6), output_type="np").images
    assert _diff(out.images, ref) <= TOL
    assert _diff(out.images, kv_only.images) > 30 * TOL


def test_composes_with_perfusion(tiny_dir, ip_dir, tmp_path):
    """A rank1 (Perfusion) concept and an IP-Adapter on one request, in one batch with each alone:
    served in one forward per step, and each adapter changes the image."""
    import shutil

    from impasto.adapters.rank1 import fingerprint, write_rank1

    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(tmp_path))
    try:
        eng.adapters.compute_covariance(eng.base.tokenizer, eng.base.text_encoder,
                                        ["a photo of a star", "a red square", "a blue circle on grass", "a dog"])
        shutil.copy(os.path.join(ip_dir, "base.safetensors"), tmp_path / "ip.safetensors")
        eng.adapters.register("ip", str(tmp_path / "ip.safetensors"), image_encoder=os.path.join(ip_dir, "image_encoder"))
        g = torch.Generator().manual_seed(3)
        unet = eng.base.unet
        # The edit reaches only the prompt's own positions (not the padding), so a random concept
        # moves the image measurably only with its gate open (beta 0) and o* well away from W e (4x)
        layers = {n: (4 * torch.randn(a.to_k.out_features, generator=g), 4 * torch.randn(a.to_v.out_features, generator=g))
                  for n, a in eng.attn2.items()}
        dim = unet.config.cross_attention_dim
        write_rank1(tmp_path / "r1.safetensors", layers=layers, i_star=torch.randn(dim, generator=g),
                    token_embedding=torch.randn(dim, generator=g), placeholder="<r>", super_word="star", beta=0.0,
                    tau=0.2, fingerprint=fingerprint(unet))
        eng.adapters.register("r1", str(tmp_path / "r1.safetensors"))
        img = images(44)[0]
        kw = dict(steps=STEPS, seed=1, output_type="np")
        reqs = [impasto.Request("a <r> on grass", adapters=["r1", ("ip", 0.8)], ip_adapter_image=img, **kw),
                impasto.Request("a <r> on grass", adapters=["r1"], **kw),
                impasto.Request("a star on grass", adapters=[("ip", 0.8)], ip_adapter_image=img, **kw)]
        outs, calls = generate_counting_rows(eng, reqs)
    finally:
        eng.close()
    assert [o.error for o in outs] == [None] * 3 and calls == [6] * STEPS
    assert _diff(outs[0].images, outs[1].images) > 30 * TOL and _diff(outs[0].images, outs[2].images) > 30 * TOL


def test_style_branches_get_the_image(ip_engine, tiny_dir, tmp_path):
    """With a style (Pair Customization), every conditional branch — cond and style — reads the
    image tokens; the request is one forward of 3 rows per step."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    torch.manual_seed(8)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"]),
                     adapter_name="s")
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="s")))
    ip_engine.adapters.register("sty", str(tmp_path / "pytorch_lora_weights.safetensors"), family="style",
                                suffix="striped")
    img = images(42)[0]
    g = impasto.Guidance(cfg=5.0, styles={"sty": 1.5})
    try:
        reqs = [impasto.Request("a red star", adapters=[("ip", 0.7)], ip_adapter_image=img, guidance=g, steps=STEPS,
                                seed=2, output_type="np"),
                impasto.Request("a red star", guidance=g, steps=STEPS, seed=2, output_type="np")]
        outs, calls = generate_counting_rows(ip_engine, reqs)
    finally:
        ip_engine.adapters.unregister("sty")
    assert [o.error for o in outs] == [None, None]
    assert calls == [3 + 3] * STEPS
    assert _diff(outs[0].images, outs[1].images) > 30 * TOL


# ------------------------------------------------------------------------------ bad input


def test_bad_requests_fail_alone(ip_engine):
    good = impasto.Request("a red star", adapters=[("ip", 0.5)], ip_adapter_image=images(50)[0], steps=2, seed=0)
    png = io.BytesIO()
    images(51)[0].save(png, format="PNG")
    bad = {
        "not an image": dict(adapters=[("ip", 0.5)], ip_adapter_image="ref.png"),
        "corrupt bytes": dict(adapters=[("ip", 0.5)], ip_adapter_image=b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
        "truncated png": dict(adapters=[("ip", 0.5)], ip_adapter_image=png.getvalue()[: len(png.getvalue()) // 2]),
        "image, no encoder adapter": dict(ip_adapter_image=images(52)[0]),
        "encoder adapter, no image": dict(adapters=[("ip", 0.5)]),
        "two encoder adapters": dict(adapters=[("ip", 0.5), ("ip-plus", 0.5)], ip_adapter_image=images(53)[0]),
        "options": dict(adapters=[impasto.Adapter("ip", 0.5, image=1)], ip_adapter_image=images(53)[0]),
        "empty list": dict(adapters=[("ip", 0.5)], ip_adapter_image=[]),
    }
    reqs = [good] + [impasto.Request("x", steps=2, **kw) for kw in bad.values()]
    outs = ip_engine.generate_batch(reqs)
    assert outs[0].error is None and outs[0].images
    for (what, _), out in zip(bad.items(), outs[1:]):
        assert isinstance(out.error, impasto.RequestError), what
    assert "ip_adapter_image" in str(outs[1].error) and "str" in str(outs[1].error)
    assert "not a readable image" in str(outs[2].error)
    # encoded bytes are an accepted image
    ok = ip_engine.generate("a red star", adapters=[("ip", 0.5)], ip_adapter_image=png.getvalue(), steps=2, seed=0)
    assert ok.images


def test_absurd_image_size_refused(ip_engine):
    big = Image.new("RGB", (4096, 4097))
    with pytest.raises(impasto.RequestError, match="max_pixels"):
        ip_engine.generate("x", adapters=[("ip", 0.5)], ip_adapter_image=big, steps=2)


def test_encoder_mismatch_is_a_shape_error(ip_engine, ip_dir, tmp_path):
    # the classic mismatch: a file made for another CLIP encoder (ViT-H vs bigG)
    other = write_encoder(str(tmp_path / "bigG"), projection_dim=40, hidden_size=48, num_attention_heads=4)
    with pytest.raises(impasto.AdapterShapeError, match="another CLIP image encoder"):
        ip_engine.adapters.register("ip-x", os.path.join(ip_dir, "base.safetensors"), image_encoder=other)
    with pytest.raises(impasto.AdapterShapeError, match="another CLIP image encoder"):
        ip_engine.adapters.register("ip-y", os.path.join(ip_dir, "plus.bin"), image_encoder=other)
    assert "ip-x" not in ip_engine.adapters and "ip-y" not in ip_engine.adapters


def test_hostile_and_malformed_files(ip_engine, ip_dir, tmp_path):
    enc = os.path.join(ip_dir, "image_encoder")
    unet = ip_engine.base.unet
    D = unet.config.cross_attention_dim
    proj, ip = base_proj(D, VISION["projection_dim"], 1), ip_layers(unet, D, 2)
    cases = {
        "missing layer": (dict(proj), {k: v for k, v in ip.items() if not k.startswith("1.")}, impasto.AdapterFormatError),
        "wrong width": (dict(proj), {**ip, "1.to_k_ip.weight": torch.zeros(7, D)}, impasto.AdapterShapeError),
        "extra key": ({**proj, "extra": torch.zeros(1)}, ip, impasto.AdapterFormatError),
        "lora layers": (dict(proj), {**ip, "1.to_k_lora.down.weight": torch.zeros(1, D)}, impasto.AdapterUnsupportedError),
    }
    for i, (what, (p, q, err)) in enumerate(cases.items()):
        path = save_safetensors(str(tmp_path / f"bad{i}.safetensors"), p, q)
        with pytest.raises(err):
            ip_engine.adapters.register(f"bad{i}", path, image_encoder=enc)
    nan = save_bin(str(tmp_path / "nan.bin"), {**proj, "norm.bias": torch.full((D,), float("nan"))}, ip)
    ip_engine.adapters.register("nan", nan, image_encoder=enc)
    with pytest.raises(impasto.AdapterValueError, match="NaN"):
        ip_engine.generate("x", adapters=[("nan", 0.5)], ip_adapter_image=images(1)[0], steps=2)
    ip_engine.adapters.unregister("nan")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = str(tmp_path / "evil.bin")
    torch.save({"image_proj": {"proj.weight": Evil()}, "ip_adapter": {}}, evil)
    with pytest.raises(impasto.AdapterFormatError, match="weights-only"):
        ip_engine.adapters.register("evil", evil, image_encoder=enc, family="encoder")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(impasto.AdapterFormatError, match="image_encoder= is for encoder adapters"):
        ip_engine.adapters.register("nope", os.path.join(ip_dir, "base.safetensors"), family="lora", image_encoder=enc)
    import shutil

    alone = tmp_path / "alone"  # no image_encoder/ beside the file, and the base folder has none
    alone.mkdir()
    shutil.copyfile(os.path.join(ip_dir, "base.safetensors"), alone / "base.safetensors")
    with pytest.raises(impasto.AdapterFormatError, match="image encoder"):
        ip_engine.adapters.register("noenc", str(alone / "base.safetensors"))
    beside = ip_engine.adapters.register("beside", os.path.join(ip_dir, "base.safetensors"))  # ip_dir/image_encoder/
    assert beside.image_encoder == os.path.realpath(enc)
    ip_engine.adapters.unregister("beside")


def test_mutated_files_register_and_serve_or_fail_cleanly(ip_engine, ip_dir, tmp_path):
    """The hostile-file fuzzer's mutations (tests/test_hostile_fuzz.py) on both IP-Adapter
    layouts: each case registers and serves a finite image, or fails with an AdapterError /
    NumericalError (its own request only); nothing else escapes."""
    import random

    from test_hostile_fuzz import make_case

    enc = os.path.join(ip_dir, "image_encoder")
    rng = random.Random(17)
    seeds = [os.path.join(ip_dir, "base.safetensors"), os.path.join(ip_dir, "plus.bin")]
    registered, refused, bad = [], 0, []
    for i in range(40):
        path = make_case(i, "encoder", seeds[i % 2], tmp_path, rng)
        try:
            ip_engine.adapters.register(f"m{i}", path, image_encoder=enc, family="encoder")
            registered.append(f"m{i}")
        except impasto.AdapterError:
            refused += 1
        except Exception as e:  # noqa: BLE001 - the point: none may escape
            bad.append((i, f"registration raised {type(e).__name__}: {e}"))
    img = images(60)[0]
    outs = ip_engine.generate_batch([impasto.Request("a star", adapters=[(n, 0.5)], ip_adapter_image=img, steps=1,
                                                     guidance=1.0, output_type="np") for n in registered])
    for n, out in zip(registered, outs):
        if out.error is None:
            assert np.isfinite(out.images).all(), n
        elif not isinstance(out.error, (impasto.AdapterError, impasto.NumericalError)):
            bad.append((n, f"request error {type(out.error).__name__}: {out.error}"))
        ip_engine.adapters.unregister(n)
    assert not bad, bad[:5]
    assert refused >= 5 and registered, (refused, len(registered))


def test_cli_ip_adapter_image(tiny_dir, ip_dir, tmp_path, capsys):
    from impasto.cli import main

    ref, out = tmp_path / "ref.png", tmp_path / "out.png"
    images(70)[0].save(ref)
    args = ["generate", "a photo of a star on a green background", "-o", str(out), "--model", tiny_dir, "--steps", "2",
            "--seed", "3", "-q", "--register", f"ip={os.path.join(ip_dir, 'base.safetensors')}",
            "--image-encoder", os.path.join(ip_dir, "image_encoder")]
    assert main(args + ["--ip-adapter-image", str(ref), "--adapter", "ip=0.7"]) == 0
    with_image = np.asarray(Image.open(out))
    assert main(args) == 0  # the same command without the image or the adapter
    assert np.abs(with_image.astype(int) - np.asarray(Image.open(out)).astype(int)).max() > 0
    assert main(args + ["--ip-adapter-image", str(tmp_path / "missing.png"), "--adapter", "ip=0.7"]) == 2
    assert main(args + ["--adapter", "ip=0.7"]) == 2  # an encoder adapter without an image
    assert "needs a reference image" in capsys.readouterr().err


def test_compiled_unet_serves_images_without_recompile(tiny_dir, ip_dir, ip_engine):
    """Different images, scales, variants (4 or 16 tokens) and rows without an image share one
    compiled graph: the image keys have a fixed capacity and a mask."""
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)

    torch._dynamo.reset()
    eng = impasto.Engine.from_pretrained(tiny_dir, device="cpu", compile=backend)
    enc = os.path.join(ip_dir, "image_encoder")
    eng.adapters.register("ip", os.path.join(ip_dir, "base.safetensors"), image_encoder=enc)
    eng.adapters.register("ip-plus", os.path.join(ip_dir, "plus.bin"), image_encoder=enc)
    a, b = images(80)[0], images(81)[0]

    def batch(first, second):
        return [impasto.Request("a red star", steps=2, seed=i, output_type="latent", **kw)
                for i, kw in enumerate((first, second))]

    batches = [
        batch(dict(adapters=[("ip", 0.5)], ip_adapter_image=a), {}),
        batch({}, dict(adapters=[("ip-plus", 0.9)], ip_adapter_image=b)),
        batch(dict(adapters=[("ip", 0.2)], ip_adapter_image=[a, b]), dict(adapters=[("ip", 0.7)], ip_adapter_image=b)),
    ]
    try:
        first = eng.generate_batch(batches[0])
        assert [o.error for o in first] == [None, None]
        n = len(compiles)
        assert n > 0
        outs = [first]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for reqs in batches[1:]:
                outs.append(eng.generate_batch(reqs))
                assert [o.error for o in outs[-1]] == [None, None]
        assert len(compiles) == n, "a later batch compiled a new graph"
    finally:
        eng.close()
        torch._dynamo.reset()
    for reqs, got in zip(batches, outs):
        for o, r in zip(got, ip_engine.generate_batch(reqs)):
            torch.testing.assert_close(o.images, r.images, rtol=1e-4, atol=1e-4)


def _sparse_safetensors(path, shapes: dict) -> str:
    """A safetensors file of fp16 zeros with `shapes`, written as a header and a sparse tail:
    SD 1.5-sized files without writing their bytes (registration reads headers only)."""
    import json
    import struct

    header, offset = {}, 0
    for key, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return path


def test_sd15_shapes_and_the_vit_h_bigg_mismatch(tmp_path):
    """At SD 1.5 shapes: ip-adapter_sd15 (ViT-H, 1024-wide embeds) and ip-adapter-plus_sd15
    (1280-wide hidden states, 12 heads) register against a ViT-H encoder config, and are refused
    with an AdapterShapeError naming the mismatch against a ViT-bigG one (1280 / 1664)."""
    import json

    from diffusers import UNet2DConditionModel

    from impasto.adapters.store import AdapterStore

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config
    ids = encoder_format.layer_ids(unet)
    assert sorted(ids.values()) == list(range(1, 32, 2))
    mods = dict(unet.named_modules())
    assert sum(mods[n].to_k.out_features for n in ids) == 12_480
    ip = {}
    for name, i in ids.items():
        h = mods[name].to_k.out_features
        ip[f"ip_adapter.{i}.to_k_ip.weight"] = ip[f"ip_adapter.{i}.to_v_ip.weight"] = (h, 768)
    base = {"image_proj.proj.weight": (3072, 1024), "image_proj.proj.bias": (3072,),
            "image_proj.norm.weight": (768,), "image_proj.norm.bias": (768,)}
    plus = {"image_proj.latents": (1, 16, 768), "image_proj.proj_in.weight": (768, 1280),
            "image_proj.proj_in.bias": (768,), "image_proj.proj_out.weight": (768, 768),
            "image_proj.proj_out.bias": (768,), "image_proj.norm_out.weight": (768,), "image_proj.norm_out.bias": (768,)}
    for i in range(4):
        p = f"image_proj.layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            plus[p + n + ".weight"] = plus[p + n + ".bias"] = (768,)
        plus.update({p + "0.to_q.weight": (768, 768), p + "0.to_kv.weight": (1536, 768), p + "0.to_out.weight": (768, 768),
                     p + "1.1.weight": (3072, 768), p + "1.3.weight": (768, 3072)})
    files = {"base": _sparse_safetensors(tmp_path / "ip-adapter_sd15.safetensors", {**base, **ip}),
             "plus": _sparse_safetensors(tmp_path / "ip-adapter-plus_sd15.safetensors", {**plus, **ip})}
    encoders = {}
    for name, cfg in (("vit-h", dict(hidden_size=1280, projection_dim=1024)),
                      ("vit-bigg", dict(hidden_size=1664, projection_dim=1280))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, "image_size": 224,
                                                        "architectures": ["CLIPVisionModelWithProjection"]}))
        (folder / "model.safetensors").write_bytes(b"")
        encoders[name] = str(folder)
    store = AdapterStore(unet)
    info = store.register("sd15", files["base"], image_encoder=encoders["vit-h"])
    assert (info.format, info.image_tokens, info.nbytes) == ("ip-adapter", 4, 44_639_232)  # research methods.md §4.2
    assert store.register("sd15-plus", files["plus"], image_encoder=encoders["vit-h"]).image_tokens == 16
    with pytest.raises(impasto.AdapterShapeError, match=r"reads 1024-wide .* gives 1280 \(projection_dim\)"):
        store.register("x", files["base"], image_encoder=encoders["vit-bigg"])
    with pytest.raises(impasto.AdapterShapeError, match=r"proj_in.weight reads 1280-wide .* gives 1664 \(hidden_size\)"):
        store.register("y", files["plus"], image_encoder=encoders["vit-bigg"])
