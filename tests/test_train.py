"""impasto.train: the training loop and Custom Diffusion, against an independent plain-diffusers
implementation on the same batch, noise and timesteps; reproducibility, resume, joint training,
the written folder in diffusers' processors and the engine, bad inputs."""

import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file

import impasto
from impasto.attention import PlannedCrossAttnProcessor
from impasto.tiny import world
from impasto.train import TrainInputError, custom_diffusion
from impasto.train.core import Trainer, masked_loss
from impasto.train.custom_diffusion import WEIGHTS_NAME, CustomDiffusion, concept_examples
from test_kv_serving import custom_diffusion_processors

STEPS = 3


def renders(obj="sparkle", n=4, seed=7):
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = world.sample_scene(rng, shape=obj, count=1, size="large", style="flat")
        out.append(Image.fromarray(world.render(scene, rng)))
    return out


def render_folder(folder, n=2):
    """`n` renders written as PNGs into `folder` (created); returns it."""
    folder.mkdir()
    for i, im in enumerate(renders(n=n)):
        im.save(folder / f"{i}.png")
    return folder


def hostile_checkpoint(output, step, pwned):
    """A checkpoint folder under `output` whose state.pt runs a shell command if unpickled
    without weights_only (the command would create `pwned`)."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(pwned),))

    ck = output / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(pickle.dumps({"step": Boom()}))


@pytest.fixture(scope="module")
def eng(tiny_dir):
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    yield e
    e.close()


def trainer_for(eng, concepts, *, prior=0, seed=0, steps=1, freeze="crossattn_kv"):
    ex, rows = concept_examples(eng, concepts, prompt_template=None, num_prior=0, prior_images=None, seed=seed,
                                init=None)
    if prior:
        ex += [impasto.train.Example(im, "a star", prior=True) for im in renders("moon", prior, seed=3)]
    method = CustomDiffusion(eng, rows, freeze=freeze)
    return Trainer(eng, method, ex, steps=steps, lr=1e-3, batch_size=2, seed=seed)


# ---------------------------------------------------------------------------- the reference
def diffusers_reference(tiny_dir, trainer, batch, freeze):
    """The same step as diffusers' train_custom_diffusion.py computes it: CustomDiffusionAttnProcessor2_0
    on every attention layer, the placeholder added to the tokenizer, the loss written out."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    params = trainer.method.parameters()
    procs = {}
    for name in unet.attn_processors:
        layer = name.removesuffix(".processor")
        attn = unet.get_submodule(layer)
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False,
                                                          hidden_size=attn.to_q.out_features)
            continue
        q_out = freeze == "crossattn"
        proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=q_out, hidden_size=attn.to_k.out_features,
                                               cross_attention_dim=attn.to_k.in_features)
        state = {"to_k_custom_diffusion.weight": params[f"{layer}.to_k"].detach().clone(),
                 "to_v_custom_diffusion.weight": params[f"{layer}.to_v"].detach().clone()}
        if q_out:
            state["to_q_custom_diffusion.weight"] = params[f"{layer}.to_q"].detach().clone()
            state["to_out_custom_diffusion.0.weight"] = params[f"{layer}.to_out.weight"].detach().clone()
            state["to_out_custom_diffusion.0.bias"] = params[f"{layer}.to_out.bias"].detach().clone()
        proc.load_state_dict(state)
        procs[name] = proc
    unet.set_attn_processor(procs)
    placeholders = [k.removeprefix("token.") for k in params if k.startswith("token.")]
    tok.add_tokens(placeholders)
    te.resize_token_embeddings(len(tok))
    ids = tok.convert_tokens_to_ids(placeholders)
    emb = te.get_input_embeddings().weight
    with torch.no_grad():
        for p, i in zip(placeholders, ids):
            emb[i] = params[f"token.{p}"].detach()
    te.requires_grad_(False)
    emb.requires_grad_(True)
    input_ids = tok(batch.texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    hidden = te(input_ids)[0]
    sched = trainer.noise_scheduler
    x_t = sched.add_noise(batch.latents, batch.noise, batch.timesteps)
    pred = unet(x_t, batch.timesteps, hidden).sample
    n = batch.n_instance
    err = torch.nn.functional.mse_loss(pred[:n].float(), batch.noise[:n].float(), reduction="none")
    loss = ((err * batch.mask).sum([1, 2, 3]) / batch.mask.sum([1, 2, 3])).mean()
    if pred.shape[0] > n:
        loss = loss + torch.nn.functional.mse_loss(pred[n:].float(), batch.noise[n:].float(), reduction="mean")
    loss.backward()
    grads = {f"token.{p}": emb.grad[i] for p, i in zip(placeholders, ids)}
    for name, proc in unet.attn_processors.items():
        layer = name.removesuffix(".processor")
        if not name.endswith("attn2.processor"):
            continue
        grads[f"{layer}.to_k"] = proc.to_k_custom_diffusion.weight.grad
        grads[f"{layer}.to_v"] = proc.to_v_custom_diffusion.weight.grad
        if freeze == "crossattn":
            grads[f"{layer}.to_q"] = proc.to_q_custom_diffusion.weight.grad
            grads[f"{layer}.to_out.weight"] = proc.to_out_custom_diffusion[0].weight.grad
            grads[f"{layer}.to_out.bias"] = proc.to_out_custom_diffusion[0].bias.grad
    return float(loss.detach()), grads


@pytest.mark.parametrize("freeze", ["crossattn_kv", "crossattn"])
def test_gradients_equal_plain_diffusers(tiny_dir, eng, freeze):
    tr = trainer_for(eng, [{"images": renders(), "placeholder": "<new1>", "class_word": "star"}], prior=2,
                     freeze=freeze)
    with torch.no_grad():  # away from the base weights, so every delta term is exercised
        g = torch.Generator().manual_seed(5)
        for p in tr.params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
    batch = tr.make_batch()
    assert batch.n_instance == 2 and len(batch.texts) == 4 and 0 < float(batch.mask.mean()) <= 1
    loss = tr.loss(batch)
    loss.backward()
    ref_loss, ref = diffusers_reference(tiny_dir, tr, batch, freeze)
    assert abs(float(loss.detach()) - ref_loss) <= 1e-5 * abs(ref_loss)
    assert set(ref) == set(tr.params)
    for name, p in tr.params.items():
        assert p.grad is not None and float(ref[name].norm()) > 0, name
        rel = float((p.grad - ref[name]).norm() / ref[name].norm())
        assert rel <= 1e-5, (name, rel)


def test_training_after_serving_a_lora_ignores_its_tables(eng, tmp_path):
    """A served LoRA's per-row tables stay with its layout: the training forward that follows
    (same engine, same batch) gives the loss it gives before anything was served."""
    from test_engine_core import Q, _lora

    tr = trainer_for(eng, [{"images": renders(), "placeholder": "<new9>", "class_word": "star"}])
    batch = tr.make_batch()
    with torch.no_grad():
        before = float(tr.loss(batch))
    eng.adapters.register("served9", _lora(tmp_path / "served.safetensors", key=Q, scale=10.0))
    try:
        eng.generate("a star", adapters=[("served9", 1.0)], steps=1, seed=0, output_type="latent")
        with torch.no_grad():
            assert float(tr.loss(batch)) == before
    finally:
        eng.adapters.unregister("served9")


def test_masked_loss_is_the_scripts():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    mask = (torch.rand(2, 1, 5, 5, generator=g) > 0.5).float()
    loss = masked_loss(pred, target, mask, 2, 0.5)
    inst = sum(((pred[b] - target[b]) ** 2 * mask[b]).sum() / mask[b].sum() for b in range(2)) / 2
    assert torch.allclose(loss, inst + 0.5 * ((pred[2] - target[2]) ** 2).mean())


def test_training_forward_goes_through_the_serving_path(eng, monkeypatch, tmp_path):
    """The same processor reads planned K/V with autograd on, and the kv family's own plan
    contribution computes them, as many times per forward as in generate."""
    calls = {"proc": 0, "grad": 0, "kv": 0}
    call, add = PlannedCrossAttnProcessor.__call__, impasto.adapters.families.kv._add_deltas

    def counting_call(self, attn, hidden_states, *a, **kw):
        kv = self.state.planned_kv(self.name)
        if kv is not None:
            calls["proc"] += 1
            calls["grad"] += int(torch.is_grad_enabled() and kv[0].requires_grad)
        return call(self, attn, hidden_states, *a, **kw)

    def counting_add(*a, **kw):
        calls["kv"] += 1
        return add(*a, **kw)

    monkeypatch.setattr(PlannedCrossAttnProcessor, "__call__", counting_call)
    monkeypatch.setattr(impasto.adapters.families.kv, "_add_deltas", counting_add)
    tr = trainer_for(eng, [{"images": renders(n=2), "placeholder": "<new1>", "class_word": "star"}], steps=1)
    tr.train_step()
    train_calls = dict(calls)
    n_attn2 = len(eng.attn2)
    assert train_calls == {"proc": n_attn2, "grad": n_attn2, "kv": n_attn2}
    tr.method.write(eng, str(tmp_path))
    eng.adapters.register("counted", str(tmp_path))
    calls.update(proc=0, grad=0, kv=0)
    eng.generate("a <new1> star", adapters=["counted"], steps=1, seed=0)
    eng.adapters.unregister("counted")
    assert calls == {"proc": n_attn2, "grad": 0, "kv": n_attn2}


# ---------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def run_a(eng, tmp_path_factory):
    out = tmp_path_factory.mktemp("a")
    return custom_diffusion(eng, renders(), class_word="star", steps=STEPS + 1, batch_size=2, lr=1e-3,
                            output=out, progress=False, seed=3, checkpoint_every=2, compress=True)


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))
            if n.endswith(".safetensors")}


def test_same_seed_same_adapter_bit_for_bit(eng, run_a, tmp_path):
    b = custom_diffusion(eng, renders(), class_word="star", steps=STEPS + 1, batch_size=2, lr=1e-3,
                         output=tmp_path / "b", progress=False, seed=3)
    c = custom_diffusion(eng, renders(), class_word="star", steps=STEPS + 1, batch_size=2, lr=1e-3,
                         output=tmp_path / "c", progress=False, seed=4)
    assert _files(run_a.path) == _files(b.path) and run_a.losses == b.losses
    assert _files(run_a.path).keys() == _files(c.path).keys() and _files(run_a.path) != _files(c.path)
    assert len(run_a.losses) == STEPS + 1 and all(np.isfinite(run_a.losses)) and run_a.nbytes > 0


def test_resume_is_bit_identical(eng, run_a, tmp_path):
    out = tmp_path / "r"
    kw = dict(class_word="star", batch_size=2, lr=1e-3, output=out, progress=False, seed=3, checkpoint_every=2)
    first = custom_diffusion(eng, renders(), steps=2, **kw)
    assert os.path.isfile(out / "checkpoint-2" / "state.pt") and len(first.losses) == 2
    second = custom_diffusion(eng, renders(), steps=STEPS + 1, resume=True, **kw)
    assert second.losses == run_a.losses and _files(out) == _files(run_a.path)
    assert second.steps == STEPS + 1


def test_written_folder_loads_in_diffusers_and_the_engine(tiny_dir, eng, run_a):
    """diffusers: CustomDiffusionAttnProcessor2_0 on all attention layers from the written
    weights (load_attn_procs silently does nothing, methods.md §1.6), the token through
    load_textual_inversion; impasto: adapters.register of the folder and of the compressed file."""
    weights = load_file(os.path.join(run_a.path, WEIGHTS_NAME))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    procs = custom_diffusion_processors(
        pipe.unet, lambda name, _: {k.removeprefix(name + "."): v for k, v in weights.items() if k.startswith(name + ".")})
    pipe.unet.set_attn_processor(procs)
    pipe.load_textual_inversion(os.path.join(run_a.path, "<new1>.safetensors"), token="<new1>")
    prompt = "a <new1> star on a blue background"
    ref = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(2), output_type="np").images
    eng.adapters.register("trained", run_a.path)
    eng.adapters.register("trained-small", run_a.files["compressed"])
    try:
        out = eng.generate(prompt, adapters=["trained"], steps=4, seed=2, output_type="np").images
        small = eng.generate(prompt, adapters=["trained-small"], steps=4, seed=2, output_type="np").images
        base = eng.generate("a star on a blue background", steps=4, seed=2, output_type="np").images
    finally:
        eng.adapters.unregister("trained")
        eng.adapters.unregister("trained-small")
    assert float(np.abs(out - ref).max()) <= 1e-3
    assert float(np.abs(out - base).max()) > 1e-2
    assert np.isfinite(small).all() and os.path.getsize(run_a.files["compressed"]) < os.path.getsize(
        run_a.files["weights"])


def test_crossattn_folder_round_trip(tiny_dir, eng, tmp_path):
    """freeze="crossattn": train -> write -> engine.adapters.register -> generate equals diffusers'
    processors with train_q_out=True on the written weights (and Q/out are what makes it so)."""
    with pytest.raises(TrainInputError, match="compress"):
        custom_diffusion(eng, renders(), class_word="star", steps=1, output=tmp_path / "x", progress=False,
                         freeze="crossattn", compress=True)
    r = custom_diffusion(eng, renders(), class_word="star", steps=2, batch_size=2, lr=1e-2, output=tmp_path / "q",
                         progress=False, seed=3, freeze="crossattn")
    weights = load_file(os.path.join(r.path, WEIGHTS_NAME))
    assert any(k.endswith("to_out_custom_diffusion.0.bias") for k in weights)
    prompt = "a <new1> star on a blue background"

    def diffusers(q_out):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        keep = ("to_k", "to_v", "to_q", "to_out") if q_out else ("to_k", "to_v")
        pipe.unet.set_attn_processor(custom_diffusion_processors(
            pipe.unet, lambda name, _: {k.removeprefix(name + "."): v for k, v in weights.items()
                                        if k.startswith(name + ".") and k.removeprefix(name + ".").startswith(keep)},
            q_out))
        pipe.load_textual_inversion(os.path.join(r.path, "<new1>.safetensors"), token="<new1>")
        return pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(2), output_type="np").images

    eng.adapters.register("trained-q", r.path)
    try:
        out = eng.generate(prompt, adapters=["trained-q"], steps=4, seed=2, output_type="np").images
    finally:
        eng.adapters.unregister("trained-q")
    ref = diffusers(True)
    assert float(np.abs(out - ref).max()) <= 1e-3
    assert float(np.abs(ref - diffusers(False)).max()) > 1e-2


def test_joint_training_moves_every_token(eng, tmp_path):
    concepts = [{"images": renders("sparkle", 2), "placeholder": "<new1>", "class_word": "star"},
                {"images": renders("moon", 2), "placeholder": "<new2>", "class_word": "circle"}]
    r = custom_diffusion(eng, concepts=concepts, steps=STEPS, batch_size=2, lr=1e-3, output=tmp_path,
                         progress=False)
    emb = eng.base.text_encoder.get_input_embeddings().weight
    tok = eng.base.tokenizer
    for ph, word in (("<new1>", "star"), ("<new2>", "circle")):
        row = load_file(r.files[ph])[ph]
        init = emb[tok(word, add_special_tokens=False).input_ids[0]]
        assert float((row - init).norm()) > 1e-4 * float(init.norm()), ph


# ---------------------------------------------------------------------------- bad input
def test_bad_inputs_are_named(eng, tmp_path):
    kw = dict(class_word="star", steps=1, output=tmp_path / "o", progress=False)
    with pytest.raises(TrainInputError, match="is not a folder"):
        custom_diffusion(eng, str(tmp_path / "missing"), **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainInputError, match="holds no image"):
        custom_diffusion(eng, str(tmp_path / "empty"), **kw)
    bad = tmp_path / "bad"
    bad.mkdir()
    renders(n=1)[0].save(bad / "a.png")
    (bad / "b.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(TrainInputError, match="b.png"):
        custom_diffusion(eng, str(bad), **kw)
    with pytest.raises(TrainInputError, match="at least 1"):
        custom_diffusion(eng, [], **kw)
    with pytest.raises(TrainInputError, match="already in the tokenizer"):
        custom_diffusion(eng, renders(n=1), placeholder="<|endoftext|>", **{**kw, "class_word": "star"})
    with pytest.raises(TrainInputError, match="form <name>"):
        custom_diffusion(eng, renders(n=1), placeholder="new1", **kw)
    with pytest.raises(TrainInputError, match="exactly one"):
        custom_diffusion(eng, renders(n=1), **{**kw, "class_word": "shooting star"})
    with pytest.raises(TrainInputError, match="lr"):
        custom_diffusion(eng, renders(n=1), **{**kw, "lr": float("nan")})
    with pytest.raises(TrainInputError, match="steps"):
        custom_diffusion(eng, renders(n=1), **{**kw, "steps": 0})
    with pytest.raises(TrainInputError, match="masks"):
        custom_diffusion(eng, renders(n=2), masks=[np.ones((32, 32))], **kw)
    with pytest.raises(TrainInputError, match="freeze"):
        custom_diffusion(eng, renders(n=1), freeze="everything", **kw)
    with pytest.raises(TrainInputError, match="used by two"):
        custom_diffusion(eng, concepts=[{"images": renders(n=1), "placeholder": "<a>", "class_word": "star"},
                                        {"images": renders(n=1), "placeholder": "<a>", "class_word": "star"}],
                         steps=1, output=tmp_path / "o", progress=False)


def test_hostile_checkpoint_is_refused(eng, tmp_path):
    hostile_checkpoint(tmp_path / "o", 5, tmp_path / "pwned")
    with pytest.raises(TrainInputError, match="state.pt"):
        custom_diffusion(eng, renders(n=1), class_word="star", steps=6, output=tmp_path / "o", progress=False,
                         resume=True)
    assert not (tmp_path / "pwned").exists()


def test_cli_trains_and_summarizes(tiny_dir, tmp_path, capsys):
    from impasto.cli import main

    imgs = render_folder(tmp_path / "imgs")
    rc = main(["train", "custom-diffusion", "--model", tiny_dir, "--images", str(imgs), "--placeholder", "<new1>",
               "--class-word", "star", "-o", str(tmp_path / "out"), "--steps", "1", "--batch-size", "1", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "trained 1 steps" in out and WEIGHTS_NAME in out and "bytes" in out
    assert os.path.isfile(tmp_path / "out" / WEIGHTS_NAME) and os.path.isfile(tmp_path / "out" / "<new1>.safetensors")
    rc = main(["train", "custom-diffusion", "--model", tiny_dir, "--images", str(tmp_path / "nope"),
               "--class-word", "star", "-o", str(tmp_path / "out2"), "-q"])
    assert rc == 2 and "is not a folder" in capsys.readouterr().err



# ---------------------------------------------------------------------------- prior preservation's class images
@pytest.fixture(scope="module")
def shipped():
    e = impasto.Engine.from_pretrained("tiny", device="cpu")
    yield e
    e.close()


def class_image_check(images, prompts, class_word):
    """What a usable prior set shows: the class shape in (nearly) every image, the backgrounds
    its prompts name, and more than one picture (distinct backgrounds read)."""
    from impasto import eval as ev
    from impasto.tiny.probes import CLASSES

    probs = ev._read(images, None)
    shape = float((probs["shape"].argmax(1) == CLASSES["shape"].index(class_word)).mean())
    read_bgs = {CLASSES["background"][int(i)] for i in probs["background"].argmax(1)}
    named = [world.parse_prompt(p).get("background") for p in prompts]
    bg = float(np.mean([CLASSES["background"][int(i)] == b for i, b in zip(probs["background"].argmax(1), named)]))
    return shape, bg, len(read_bgs)


def test_protocol_class_images_read_their_prompts_where_the_bare_class_prompt_collapses(shipped):
    """The prior set the quality protocol trains with (ConceptSet.prior_prompts, generated by
    custom_diffusion's own generate_prior) reads the class shape and the backgrounds it names, with
    many backgrounds; the script's bare "a triangle", a prompt the tiny base never saw (its captions
    always name a colour and a background), collapses to one picture: large yellow triangles on
    red or orange (docs/training.md, "Prior preservation, explained")."""
    from impasto import eval as ev
    from impasto.train.custom_diffusion import generate_prior

    cs = ev.concept_set("arrow")
    pairs = generate_prior(shipped, cs.prior_prompts(8), 8, seed=0)
    shape, bg, distinct = class_image_check([im for im, _ in pairs], [t for _, t in pairs], "triangle")
    assert shape >= 7 / 8 and bg >= 7 / 8 and distinct >= 4, (shape, bg, distinct)
    bare = [im for im, _ in generate_prior(shipped, "a triangle", 8, seed=0)]
    from impasto.tiny.probes import CLASSES

    read = [CLASSES["background"][int(i)] for i in ev._read(bare, None)["background"].argmax(1)]
    assert set(read) <= {"red", "orange"}, read  # one picture: what the old protocol's prior taught


def test_prior_prompts_and_reference_captions_follow_the_world():
    """Prior prompts name no background either split's prompts use (so never a test or validation
    context); each reference's caption names the size and background the probes read in it."""
    from impasto import eval as ev
    from impasto.tiny.probes import CLASSES

    for obj in world.NOVEL_OBJECTS:
        test, val = ev.concept_set(obj), ev.concept_set(obj, split="validation")
        split_bgs = {c[2] for c in test.contexts + val.contexts}
        prompts = test.prior_prompts(64)
        assert prompts == test.prior_prompts(64) and len(set(prompts)) >= 48
        named = [world.parse_prompt(p) for p in prompts]
        assert not {n["background"] for n in named} & split_bgs
        assert all(n["shape"] == test.class_word for n in named) and {n["count"] for n in named} == {1, 2}
        caps = test.reference_captions("<new1> " + test.class_word)
        probs = ev._read(test.images, None)
        for cap, b, s in zip(caps, probs["background"].argmax(1), probs["size"].argmax(1)):
            assert world.parse_prompt(cap)["background"] == CLASSES["background"][int(b)], cap
            assert (CLASSES["size"][int(s)] == "large") == (" large " in cap), cap


def test_captions_and_class_prompts_reach_the_batch(eng):
    """captions= gives each image its own prompt; class_prompts= are cycled over the class images
    (and their {class_word} filled in); a wrong count or a caption without the placeholder is refused."""
    ims = renders(n=2)
    caps = ["a {placeholder} {class_word} on a gray background", "a large {placeholder} {class_word} on a red background"]
    ex, _ = concept_examples(eng, [{"images": ims, "placeholder": "<new1>", "class_word": "star"}], prompt_template=None,
                             num_prior=0, prior_images=renders("moon", 3), seed=0, init=None, captions=caps,
                             class_prompts=["two {class_word}s on a blue background", "a red star"])
    assert [e.prompt for e in ex] == ["a <new1> star on a gray background", "a large <new1> star on a red background",
                                      "two stars on a blue background", "a red star", "two stars on a blue background"]
    assert [e.prior for e in ex] == [False, False, True, True, True]
    tr = Trainer(eng, CustomDiffusion(eng, {"<new1>": eng.base.text_encoder.get_input_embeddings().weight[5]}),
                 ex, steps=1, lr=1e-3, batch_size=2, seed=0)
    batch = tr.make_batch()
    assert batch.n_instance == 2 and len(batch.texts) == 4 and batch.mask.shape[0] == 2  # class rows: no mask
    assert set(batch.texts[2:]) <= {"two stars on a blue background", "a red star"}
    for bad, what in ((caps[:1], "one per image"), (["a {class_word}", caps[1]], "placeholder")):
        with pytest.raises(TrainInputError, match=what):
            concept_examples(eng, [{"images": ims, "placeholder": "<new1>", "class_word": "star"}],
                             prompt_template=None, num_prior=0, prior_images=None, seed=0, init=None, captions=bad)
    with pytest.raises(TrainInputError, match="class_prompts"):
        concept_examples(eng, [{"images": ims, "placeholder": "<new1>", "class_word": "star"}], prompt_template=None,
                         num_prior=0, prior_images=renders("moon", 1), seed=0, init=None, class_prompts=["a {shape}"])


def test_full_finetune_takes_the_same_captions(tiny_dir, tmp_path, monkeypatch):
    """The baseline can be given Custom Diffusion's data and prompts: captions= reach full
    fine-tuning's batches with the placeholder and class word filled in (its own engine: the UNet
    is trained in place); a wrong count is refused before any step."""
    from impasto.train import finetune

    seen = []

    class Recording(finetune.Trainer):
        def make_batch(self):
            batch = super().make_batch()
            seen.extend(batch.texts)
            return batch

    monkeypatch.setattr(finetune, "Trainer", Recording)
    caps = ["a {placeholder} {class_word} on a gray background, flat", "a large {placeholder} {class_word} on a black background, flat"]
    own = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    r = finetune.full_finetune(own, renders(n=2), class_word="star", captions=caps, steps=2, lr=1e-4, batch_size=2,
                               output=tmp_path / "ft", progress=False)
    assert len(r.losses) == 2 and len(seen) == 4
    assert set(seen) <= {c.format(placeholder="<new1>", class_word="star") for c in caps}, seen
    with pytest.raises(TrainInputError, match="one per image"):
        finetune.full_finetune(own, renders(n=2), class_word="star", captions=caps[:1], steps=1, lr=1e-4,
                               output=tmp_path / "ft2", progress=False)
    own.close()
