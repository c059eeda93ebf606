"""The step-level core: requests join and leave between steps and still equal their solo runs;
submit/Job from any thread; a bad request fails alone; operator limits; close()."""

import asyncio
import hashlib
import threading

import numpy as np
import pytest
import safetensors.torch
import torch

import impasto
from impasto.kernels import use_backend

LATENT_TOL, IMAGE_TOL = 1e-4, 1e-3
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _lora(path, *, seed=0, rank=4, key=Q, width=32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    safetensors.torch.save_file({f"unet.{key}.lora_A.weight": torch.randn(rank, width, generator=g),
                                 f"unet.{key}.lora_B.weight": scale * torch.randn(width, rank, generator=g)}, str(path))
    return str(path)


def _te_lora(path, *, seed=0, rank=4):
    """A kohya text-encoder-only LoRA (q_proj of the first layer)."""
    g = torch.Generator().manual_seed(seed)
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    safetensors.torch.save_file({f"{stem}.lora_down.weight": torch.randn(rank, 32, generator=g),
                                 f"{stem}.lora_up.weight": torch.randn(32, rank, generator=g),
                                 f"{stem}.alpha": torch.tensor(float(rank))}, str(path))
    return str(path)


class CountingForwards:
    """Counts the UNet forwards (and their rows); `pause_at` blocks the worker inside forward
    number `pause_at` until `release()`, so a test can submit at a known step boundary."""

    def __init__(self, engine, pause_at=None):
        self.rows, self.pause_at = [], pause_at
        self.paused, self._go = threading.Event(), threading.Event()
        self._handle = engine.base.unet.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.rows.append(args[0].shape[0])
        if len(self.rows) == self.pause_at:
            self.paused.set()
            assert self._go.wait(60), "the test never released the worker"

    def release(self):
        self._go.set()

    def remove(self):
        self._handle.remove()


@pytest.fixture(scope="module")
def eng(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("core")
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    for i in range(3):
        e.adapters.register(f"l{i}", _lora(d / f"l{i}.safetensors", seed=i))
    e.adapters.register("huge", _lora(d / "huge.safetensors", seed=9, scale=1e30,
                                      key="down_blocks.0.attentions.0.proj_in"))
    yield e
    e.close()


def _req(prompt, **kw):
    kw.setdefault("output_type", "latent")
    kw.setdefault("steps", 4)
    return impasto.Request(prompt, **kw)


def _eventually(cond, seconds=10.0):
    for _ in range(int(seconds / 0.01)):
        if cond():
            return True
        threading.Event().wait(0.01)
    return cond()


def _solo(engine, req):
    out = engine.generate_batch([req])[0]
    assert out.error is None, out.error
    return out.images


# ---------------------------------------------------------------------------------- joining
def test_joining_after_the_third_step_shares_forwards_and_equals_solo(eng):
    a = _req("a red star", seed=1, steps=6, adapters=["l0"])
    b = _req("a blue square", seed=2, steps=5, guidance=4.0, adapters=[("l1", 0.7)])
    count = CountingForwards(eng, pause_at=3)
    try:
        job_a = eng.submit(a)
        assert count.paused.wait(60)
        job_b = eng.submit(b)  # queued while A's third forward runs: joins at the next boundary
        assert job_a.progress == (2, 6) and not job_b.done()
        count.release()
        out_a, out_b = job_a.result(60), job_b.result(60)
    finally:
        count.remove()
    assert count.rows == [2, 2, 2, 4, 4, 4, 2, 2]  # B rode along from A's fourth step
    assert len(count.rows) < 6 + 5
    assert _diff(out_a.images, _solo(eng, a)) <= LATENT_TOL
    assert _diff(out_b.images, _solo(eng, b)) <= LATENT_TOL
    assert _diff(out_a.images, _solo(eng, _req("a red star", seed=1, steps=6))) > 100 * LATENT_TOL  # l0 matters


def test_four_and_six_steps_share_forwards_and_equal_solo(eng):
    reqs = [_req("a green circle", seed=3, steps=4, output_type="np"),
            _req("a green circle", seed=4, steps=6, output_type="np", num_images=2, guidance=1.0)]
    count = CountingForwards(eng)
    try:
        outs = eng.generate_batch(reqs)
    finally:
        count.remove()
    assert count.rows == [4] * 4 + [2] * 2
    stats = eng.stats()
    assert stats["rows_last_forward"] == 2 and stats["queued"] == stats["running"] == 0 and stats["alive"]
    for req, out in zip(reqs, outs):
        assert _diff(out.images, _solo(eng, req)) <= IMAGE_TOL
    assert _diff(outs[0].images, outs[1].images[:1]) > 100 * IMAGE_TOL


def test_eight_threads_get_the_images_of_a_serial_run(eng):
    reqs = [_req(f"shape number {i}", seed=i, steps=1 + i % 4, guidance=(7.5, 1.0, 3.0)[i % 3],
                 adapters=[[], ["l0"], [("l1", 0.5), "l2"]][(i // 3) % 3], num_images=1 + (i % 5 == 0))
            for i in range(24)]
    serial = [_solo(eng, r) for r in reqs]
    results = [None] * len(reqs)

    def client(k):
        jobs = [(i, eng.submit(reqs[i])) for i in range(k, len(reqs), 8)]
        for i, job in jobs:
            results[i] = job.result(120).images

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for got, want in zip(results, serial):
        assert got is not None and _diff(got, want) <= LATENT_TOL


# ---------------------------------------------------------------------------------- Job
def test_job_progress_callback_cancel_and_timeout(eng):
    count = CountingForwards(eng, pause_at=1)
    try:
        running = eng.submit(_req("a", seed=1, steps=5))
        assert count.paused.wait(60)
        queued = eng.submit(_req("b", seed=2, steps=3))
        late = eng.submit(_req("c", seed=3, steps=3, timeout=0.01))
        seen = []
        queued.add_done_callback(lambda j: seen.append(j.output().error))
        assert queued.cancel() and running.cancel()
        threading.Event().wait(0.05)  # past late's deadline while it waits
        count.release()
        with pytest.raises(impasto.RequestCancelledError):
            running.result(60)
        with pytest.raises(impasto.RequestCancelledError):
            queued.result(60)
        with pytest.raises(impasto.RequestTimeoutError, match="timeout"):
            late.result(60)
    finally:
        count.remove()
    assert running.progress[0] < 5 and running.cancelled()
    assert _eventually(lambda: seen) and isinstance(seen[0], impasto.RequestCancelledError)
    assert not running.cancel()  # already done
    done = eng.submit(_req("d", seed=4, steps=2))
    assert done.result(60).error is None and done.done() and done.progress == (2, 2)
    after = []
    done.add_done_callback(after.append)  # already done: called at once
    assert after == [done]


def test_agenerate(eng):
    async def main():
        return await asyncio.gather(eng.agenerate("x", seed=5, steps=2, output_type="latent"),
                                    eng.agenerate("y", seed=6, steps=3, output_type="latent"))

    outs = asyncio.run(main())
    assert _diff(outs[0].images, _solo(eng, _req("x", seed=5, steps=2))) <= LATENT_TOL
    assert _diff(outs[1].images, _solo(eng, _req("y", seed=6, steps=3))) <= LATENT_TOL


def test_generate_from_a_done_callback_is_refused(eng):
    errors = []

    def callback(job):
        try:
            eng.generate("again", steps=1)
        except RuntimeError as e:
            errors.append(e)

    job = eng.submit(_req("x", seed=1, steps=1))
    job.add_done_callback(callback)
    job.result(60)
    assert _eventually(lambda: errors) and "worker thread" in str(errors[0])


def test_backend_override_reaches_the_worker_and_stays_in_its_context(eng, monkeypatch):
    from impasto.kernels import native

    monkeypatch.setitem(native._state, "origin", None)  # as if not built: every op on it is refused
    monkeypatch.setattr(native, "load", lambda: False)
    req = _req("a red star", seed=1, steps=1)
    with use_backend("native"):
        out = eng.generate_batch([req])[0]
    assert isinstance(out.error, impasto.RequestFailedError) and "native" in str(out.error)
    assert eng.generate_batch([req])[0].error is None  # the override did not leak


# ---------------------------------------------------------------------------------- fail alone
GOOD = [dict(prompt="a red star", seed=1, adapters=["l0"]), dict(prompt="a blue star", seed=2, guidance=1.0)]


def _alone(engine, bad, *, exc, match="", n_good=GOOD):
    """Submit `bad` between good requests: it alone fails with `exc`, the others equal solo."""
    good = [_req(**kw) for kw in n_good]
    outs = engine.generate_batch([good[0], bad, good[1]])
    assert isinstance(outs[1].error, exc), outs[1].error
    assert match in str(outs[1].error)
    assert outs[1].images is None
    for req, out in zip(good, (outs[0], outs[2])):
        assert out.error is None, out.error
        assert _diff(out.images, _solo(engine, req)) <= LATENT_TOL
    return outs[1].error


@pytest.mark.parametrize("bad, match", [
    (dict(seed=2**64), "seed"),
    (dict(steps=1001), "steps"),
    (dict(guidance=impasto.Guidance(styles=None)), "guidance.styles"),
    (dict(adapters=[impasto.Adapter(123)]), "adapter name"),
    (dict(adapters={"l0": "x"}), "scale"),
    (dict(guidance=impasto.Guidance(cfg=float("inf"))), "guidance.cfg"),
    (dict(guidance=impasto.Guidance(styles={"s": float("inf")})), "weight"),
    (dict(adapters=[("l0", float("inf"))]), "scale"),
])
def test_bad_fields_fail_alone(eng, bad, match):
    _alone(eng, _req("bad", **{"seed": 3, **bad}), exc=impasto.RequestError, match=match)


def test_dict_adapters_mean_name_to_scale(eng):
    a = _solo(eng, _req("a dog", seed=4, adapters={"l0": 0.5, "l1": -0.3}))
    b = _solo(eng, _req("a dog", seed=4, adapters=[("l0", 0.5), ("l1", -0.3)]))
    c = _solo(eng, _req("a dog", seed=4, adapters=["l0", "l1"]))
    assert _diff(a, b) == 0.0 and _diff(a, c) > 100 * LATENT_TOL


def test_non_finite_latents_are_a_numerical_error(eng):
    _alone(eng, _req("bad", seed=3, adapters=["huge"]), exc=impasto.NumericalError, match="NaN or Inf")


def test_allocation_failure_in_the_shared_forward_fails_alone(eng):
    """The shared forward raises (rows >= 4 'do not fit'): each request is retried alone, and
    only the one that cannot run alone (2 images, 4 rows) fails."""
    def oom(module, args):
        if args[0].shape[0] >= 4:
            raise torch.OutOfMemoryError("simulated: out of memory")

    handle = eng.base.unet.register_forward_pre_hook(oom)
    try:
        err = _alone(eng, _req("bad", seed=3, num_images=2), exc=impasto.RequestFailedError, match="out of memory")
    finally:
        handle.remove()
    assert "request 1" in str(err) and isinstance(err.__cause__, torch.OutOfMemoryError)


def test_two_text_encoder_loras_overflowing_one_bucket_fail_alone(tiny_dir, tmp_path):
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu", slots_per_bucket=1)
    try:
        e.adapters.register("l0", _lora(tmp_path / "l0.safetensors"))
        e.adapters.register("t0", _te_lora(tmp_path / "t0.safetensors", seed=0))
        e.adapters.register("t1", _te_lora(tmp_path / "t1.safetensors", seed=1))
        _alone(e, _req("bad", seed=3, adapters=["t0", "t1"]), exc=impasto.AdapterError, match="slots")
    finally:
        e.close()


@pytest.fixture(scope="module")
def rank1_eng(tiny_dir, tmp_path_factory):
    from test_rank1_serving import CAPTIONS, _concept

    root = tmp_path_factory.mktemp("r1")
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu", adapter_root=str(root))
    e.adapters.compute_covariance(e.base.tokenizer, e.base.text_encoder, CAPTIONS)
    good = _concept(e, 1, "<teddy>", "teddy", root)
    e.adapters.register("teddy", good)
    f = safetensors.torch.load_file(good)
    meta = safetensors.safe_open(good, "pt").metadata()
    f["i_star"] = torch.zeros_like(f["i_star"])
    safetensors.torch.save_file(f, str(root / "zero.safetensors"), metadata=meta)
    e.adapters.register("zero", str(root / "zero.safetensors"))
    e.adapters.register("l0", _lora(root / "l0.safetensors"))
    yield e
    e.close()


@pytest.mark.parametrize("adapter, exc, match", [
    (impasto.Adapter("teddy", beta="abc"), impasto.RequestError, "beta"),
    (impasto.Adapter("teddy", tau=float("nan")), impasto.RequestError, "tau"),
    (impasto.Adapter("zero"), impasto.AdapterValueError, "all zeros"),
])
def test_rank1_triggers_fail_alone(rank1_eng, adapter, exc, match):
    _alone(rank1_eng, _req("a <teddy>", seed=3, adapters=[adapter]), exc=exc, match=match)


# ---------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("limit, value, kwargs, match", [
    ("max_pixels", 32 * 32, dict(height=64, width=32), "max_pixels"),
    ("max_steps", 5, dict(steps=6), "max_steps"),
    ("max_steps", 5000, dict(steps=1001), "training timesteps"),
    ("max_steps", 5000, dict(steps=1000), "reach timestep 1000.*at most 999 steps"),  # leading spacing, offset 1
    ("max_num_images", 2, dict(num_images=3), "max_num_images"),
    ("max_styles", 1, dict(guidance=impasto.Guidance(styles={"a": 1.0, "b": 1.0})), "max_styles"),
    ("max_batch_rows", 4, dict(num_images=3), "max_batch_rows"),
])
def test_limits_are_request_errors_naming_the_limit(tiny_dir, limit, value, kwargs, match):
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu", **{limit: value})
    with pytest.raises(impasto.RequestError, match=match):
        e.submit(_req("x", **kwargs))
    assert e.state.nbytes() == 0  # refused before anything was allocated
    e.close()


def test_full_queue_is_engine_busy(tiny_dir):
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu", max_queue=1)
    count = CountingForwards(e, pause_at=1)
    try:
        first = e.submit(_req("a", steps=2, seed=1))
        assert count.paused.wait(60)
        second = e.submit(_req("b", steps=2, seed=2))  # the one queue place
        with pytest.raises(impasto.EngineBusyError, match="max_queue=1"):
            e.submit(_req("c", steps=2, seed=3))
        outs = e.generate_batch([_req("d", steps=2, seed=4)])  # the batch form reports it per request
        assert isinstance(outs[0].error, impasto.EngineBusyError)
        count.release()
        assert first.result(60).error is None and second.result(60).error is None
    finally:
        count.remove()
        e.close()


def test_huge_prompt_is_cut_and_reported(eng):
    out = eng.generate("red " * 2_500_000, steps=1, seed=1, output_type="latent")
    assert any("cut from 10000000" in w for w in out.warnings)
    assert any(f"truncated to the first {75 * eng.limits['max_prompt_chunks']}" in w for w in out.warnings)
    assert not eng.generate("red star", steps=1, seed=1, output_type="latent").warnings


# ---------------------------------------------------------------------------------- state
def test_register_and_unregister_while_requests_run(eng, tmp_path):
    path = _lora(tmp_path / "churn.safetensors", seed=7)
    stop, errors = threading.Event(), []

    def churn():
        try:
            while not stop.is_set():
                eng.adapters.register("churn", path)
                eng.adapters.unregister("churn")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    reqs = [_req(f"p{i}", seed=i, steps=3, adapters=[["l0"], ["l1"]][i % 2]) for i in range(6)]
    want = [_solo(eng, r) for r in reqs]
    t = threading.Thread(target=churn)
    t.start()
    try:
        got = [j.result(60).images for j in [eng.submit(r) for r in reqs]]
    finally:
        stop.set()
        t.join(30)
    assert not errors
    for g, w in zip(got, want):
        assert _diff(g, w) <= LATENT_TOL


def test_padded_keys_are_masked(eng):
    """A row whose planned K/V are shorter than the batch's longest row (padded, masked) gives
    the same attention output as that row alone, unpadded."""
    from impasto.attention import PlannedCrossAttnProcessor
    from impasto.batch import BatchState

    name, attn = next(iter(eng.attn2.items()))
    g = torch.Generator().manual_seed(0)
    D = attn.to_k.in_features
    short, full = torch.randn(1, 50, D, generator=g), torch.randn(1, 77, D, generator=g)
    x = torch.randn(2, 16, attn.to_q.in_features, generator=g)

    def kv(e):
        return e, {name: (attn.to_k(e), attn.to_v(e))}

    state = BatchState({name: attn}, max_rows=2, max_len=77, embed_dim=D, device="cpu", dtype=torch.float32)
    proc = PlannedCrossAttnProcessor(name, state)
    with torch.no_grad():
        state.write_layout([kv(full), kv(short)])
        assert state.key_mask is not None and state.key_mask[1, 0, 0, 50:].sum() == 0
        state._buffers[1][name][0][1, 50:] = 1e4  # garbage in the padding must not matter
        state.planned = True
        both = proc(attn, x)
        state.write_layout([kv(short)])
        alone = proc(attn, x[1:])
        state.write_layout([kv(full)])
        first = proc(attn, x[:1])
    assert float((both[1:] - alone).abs().max()) <= 1e-5
    assert float((both[:1] - first).abs().max()) <= 1e-5


def test_close_restores_plain_diffusers(tiny_dir, pipe, tmp_path):
    def digest(unet):
        h = hashlib.sha256()
        for k, v in sorted(unet.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    e.adapters.register("l0", _lora(tmp_path / "l0.safetensors"))
    e.generate("a star", adapters=["l0"], steps=2, seed=0)
    e.close()
    unet = e.base.unet
    assert digest(unet) == digest(pipe.unet)
    assert not any(m._forward_hooks for m in unet.modules())
    assert not any(m._forward_hooks for m in e.base.text_encoder.modules())
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    c = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(unet(x, 10, c).sample, pipe.unet(x, 10, c).sample)
    with pytest.raises(impasto.EngineClosedError):
        e.submit(_req("x"))
