"""Every bad adapter input gets a specific AdapterError naming the file and what is wrong — at
registration when the header shows it, else at load, where it becomes that request's `.error`
while the other requests of the batch complete and equal their solo outputs."""

import os
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

import impasto

TOL = 1e-3
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def lora_file(path, *, rank=4, width=32, dtype=torch.float32, value=None, key=Q, metadata=None):
    torch.manual_seed(0)
    down, up = torch.randn(rank, width), torch.randn(width, rank)
    if value is not None:
        down[0, 0] = value
    safetensors.torch.save_file({f"unet.{key}.lora_A.weight": down.to(dtype), f"unet.{key}.lora_B.weight": up.to(dtype)},
                                str(path), metadata=metadata)
    return str(path)


class Exploit:
    """A pickle that writes a marker file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _truncated(d):
    p = lora_file(d / "t.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 40])
    return p


def _corrupt_header(d):
    p = lora_file(d / "c.safetensors")
    data = bytearray(open(p, "rb").read())
    data[8:20] = b"{not json!!!"
    open(p, "wb").write(bytes(data))
    return p


def _header_beyond_file(d):
    p = lora_file(d / "h.safetensors")
    data = bytearray(open(p, "rb").read())
    data[:8] = struct.pack("<Q", 10**9)
    open(p, "wb").write(bytes(data))
    return p


def _pickle(d):
    p = str(d / "delta.bin")
    torch.save({"unet": {"x": Exploit(str(d / "PWNED"))}}, p)
    return p


def _symlink_out(d):
    outside = lora_file(d.parent / "outside.safetensors")
    link = d / "link.safetensors"
    os.symlink(outside, link)
    return str(link)


# case -> (build(dir) -> path, exception, message fragment, register kwargs)
CASES = {
    "truncated file": (_truncated, impasto.AdapterFormatError, "", {}),
    "corrupt header": (_corrupt_header, impasto.AdapterFormatError, "", {}),
    "header length beyond the file": (_header_beyond_file, impasto.AdapterFormatError, "", {}),
    "unknown family": (lambda d: lora_file(d / "f.safetensors", metadata={"impasto.family": "hypernetwork"}),
                       impasto.AdapterFormatError, "family", {}),
    "unknown keys": (lambda d: (safetensors.torch.save_file({"weird.thing": torch.zeros(3)}, str(d / "k.safetensors")),
                                str(d / "k.safetensors"))[1], impasto.AdapterFormatError, "weird.thing", {}),
    "wrong dtype": (lambda d: lora_file(d / "dt.safetensors", dtype=torch.int32), impasto.AdapterValueError, "", {}),
    "wrong shape": (lambda d: lora_file(d / "s.safetensors", width=48), impasto.AdapterShapeError, "to_q", {}),
    "another base model": (lambda d: lora_file(d / "b.safetensors", key="down_blocks.3.attentions.0.proj_in"),
                           impasto.AdapterShapeError, "down_blocks.3", {}),
    "rank above max_rank": (lambda d: lora_file(d / "r.safetensors", rank=16), impasto.AdapterValueError, "max_rank", {}),
    "missing file": (lambda d: str(d / "nope.safetensors"), impasto.AdapterNotFoundError, "no such file", {}),
    "path escaping adapter_root (../)": (lambda d: (lora_file(d.parent / "up.safetensors"), str(d / ".." / "up.safetensors"))[1],
                                         impasto.AdapterPathError, "outside adapter_root", {}),
    "path escaping adapter_root (symlink)": (_symlink_out, impasto.AdapterPathError, "outside adapter_root", {}),
    "pickle that would execute code": (_pickle, impasto.AdapterFormatError, "", {}),
}


@pytest.fixture
def store_engine(tiny_dir, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    return impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root), max_rank=8), root


@pytest.mark.parametrize("case", list(CASES))
def test_refused_at_registration(store_engine, case):
    eng, root = store_engine
    build, exc, fragment, kw = CASES[case]
    path = build(root)
    with pytest.raises(exc) as e:
        eng.adapters.register("bad", path, **kw)
    msg = str(e.value)
    assert os.path.basename(path) in msg or path in msg, msg
    assert fragment in msg
    assert "bad" not in eng.adapters.names()
    assert not os.path.exists(root / "PWNED")  # the pickle's payload never ran


def test_duplicate_name(store_engine):
    eng, root = store_engine
    p = lora_file(root / "ok.safetensors")
    eng.adapters.register("ok", p)
    with pytest.raises(impasto.AdapterNameError, match="already registered"):
        eng.adapters.register("ok", p)


def test_placeholder_no_adapter_defines(store_engine):
    eng, _ = store_engine
    out = eng.generate_batch([impasto.Request("a photo of <sks> dog", steps=1)])[0]
    assert isinstance(out.error, impasto.AdapterNameError) and "<sks>" in str(out.error)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_bad_values_fail_only_their_request(store_engine, value):
    eng, root = store_engine
    good = lora_file(root / "good.safetensors")
    eng.adapters.register("good", good)
    bad = lora_file(root / "bad.safetensors")
    eng.adapters.register("bad", bad)  # the header is fine
    lora_file(root / "bad.safetensors", value=value)  # the values are not, once read
    reqs = [impasto.Request("a red star", adapters=["good"], seed=1, steps=3, output_type="np"),
            impasto.Request("a red star", adapters=["bad"], seed=1, steps=3, output_type="np"),
            impasto.Request("a blue star", seed=2, steps=3, output_type="np")]
    outs = eng.generate_batch(reqs)
    assert isinstance(outs[1].error, impasto.AdapterValueError) and "bad.safetensors" in str(outs[1].error)
    assert outs[1].images is None
    for i in (0, 2):
        assert outs[i].error is None
        solo = eng.generate_batch([reqs[i]])[0].images
        assert float(np.abs(outs[i].images - solo).max()) <= TOL
