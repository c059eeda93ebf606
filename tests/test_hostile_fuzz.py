"""A seeded mutation fuzzer over valid adapter files of every family and layout (issue 13).

Each case mutates one valid file (bit flips, truncations, header edits, shape and dtype edits,
metadata edits, config edits) and must end one of three ways: it registers and generates a
finite image; it raises an AdapterError subclass (at registration, or as its request's
`.error`); or its request ends with NumericalError (a flipped weight can make NaN). Any other
exception, or a case past its time limit, fails the test naming the case.
IMPASTO_FUZZ_CASES sets the number of cases (default 500), IMPASTO_FUZZ_SEED the seed.
"""

import json
import os
import random
import resource
import signal
import struct
import time

import numpy as np
import pytest
import safetensors.torch
import torch

import impasto
from impasto.adapters.rank1 import fingerprint, write_rank1
from test_hostile import Q, Q2, compressed_pickle, kv_file, lora_file

CASES = int(os.environ.get("IMPASTO_FUZZ_CASES", "500"))
SEED = int(os.environ.get("IMPASTO_FUZZ_SEED", "13"))
CASE_SECONDS = 10  # per case (registration) and per generated group
GROUP = 8  # registered cases generated together (each request fails alone)
ALLOWED = (impasto.AdapterError, impasto.NumericalError)


def seeds(eng, d):
    """{name: (path, extension, how a request uses it)} of valid files, one per family and layout."""
    d.mkdir()
    out = {
        "lora-diffusers": lora_file(d / "ld.safetensors", keys=(Q, Q2), metadata={
            "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}),
        "lora-adapter": lora_file(d / "la.safetensors", prefix="", metadata={
            "lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2, "alpha_pattern": {"to_q": 4}})}),
        "style": lora_file(d / "st.safetensors", metadata={"impasto.style_suffix": "in ink style"}),
        "kv": kv_file(d / "kv.safetensors", eng),
        "kv-compressed-pickle": compressed_pickle(d / "compressed_delta.bin", eng),
    }
    g = torch.Generator().manual_seed(1)
    flat = "lora_unet_" + Q.replace(".", "_")
    safetensors.torch.save_file({f"{flat}.lora_down.weight": torch.randn(4, 32, generator=g),
                                 f"{flat}.lora_up.weight": torch.randn(32, 4, generator=g),
                                 f"{flat}.alpha": torch.tensor(2.0)}, str(d / "kohya.safetensors"))
    out["lora-kohya"] = str(d / "kohya.safetensors")
    torch.save({f"unet.{Q}.lora_A.weight": torch.randn(4, 32, generator=g),
                f"unet.{Q}.lora_B.weight": torch.randn(32, 4, generator=g)}, d / "pickle.bin")
    out["lora-pickle"] = str(d / "pickle.bin")
    peft = d / "peft"
    peft.mkdir()
    lora_file(peft / "adapter_model.safetensors", prefix="base_model.model.")
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                          "rank_pattern": {}, "use_rslora": False}))
    out["peft"] = str(peft)
    unet = eng.base.unet
    layers = {n: (torch.randn(a.to_k.weight.shape[0], generator=g), torch.randn(a.to_v.weight.shape[0], generator=g))
              for n, a in unet.named_modules() if n.endswith("attn2")}
    dim = eng.base.text_encoder.get_input_embeddings().weight.shape[1]
    write_rank1(d / "r1.safetensors", layers=layers, i_star=torch.randn(dim, generator=g),
                token_embedding=torch.randn(dim, generator=g), placeholder="<r>", super_word="star", beta=0.5,
                tau=0.2, fingerprint=fingerprint(unet))
    out["rank1"] = str(d / "r1.safetensors")
    return out


# ------------------------------------------------------------------------------ mutations

def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, rest: bytes, rng) -> bytes:
    text = json.dumps(header).encode()
    if rng.random() < 0.1:  # keep the old length: the parser sees a cut or padded header
        return struct.pack("<Q", max(len(text) + rng.randint(-8, 8), 0)) + text + rest
    return struct.pack("<Q", len(text)) + text + rest


WEIRD = [float("nan"), 1e39, -1e39, 0, -3, 2**63, "abc", "", None, [], {}, True, 1e-40, "NaN", 3.5]


def mutate_header(data: bytes, rng) -> bytes:
    header, rest = _split(data)
    entries = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["shape", "dtype", "offsets", "drop", "rename", "metadata", "metadata-json", "type"])
    key = rng.choice(entries) if entries else None
    if kind == "shape" and key:
        shape = header[key]["shape"]
        if shape:
            i = rng.randrange(len(shape))
            shape[i] = rng.choice([0, 1, shape[i] + 1, shape[i] * 2, 10**9, 10**7, shape[i] // 2])
        if rng.random() < 0.5:  # keep the file consistent: grow or cut the data to match
            dtype_size = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I32": 4}.get(header[key]["dtype"], 4)
            size = int(np.prod(shape)) * dtype_size
            if size < 2**22:
                start = header[key]["data_offsets"][0]
                header[key]["data_offsets"][1] = start + size
                ends = {k: header[k]["data_offsets"] for k in entries}
                offset = 0
                blob = b""
                for k in sorted(entries, key=lambda k: ends[k][0]):
                    a, b = ends[k]
                    chunk = (rest[a:b] + b"\0" * (b - a))[: b - a] if k != key else (rest[a:] + b"\0" * size)[:size]
                    header[k]["data_offsets"] = [offset, offset + len(chunk)]
                    offset += len(chunk)
                    blob += chunk
                rest = blob
    elif kind == "dtype" and key:
        header[key]["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "XX", "f32"])
    elif kind == "offsets" and key:
        a, b = header[key]["data_offsets"]
        header[key]["data_offsets"] = rng.choice([[b, a], [a, b + 4], [a + 4, b], [0, 2**40], [-1, b]])
    elif kind == "drop" and key:
        del header[key]
    elif kind == "rename" and key:
        header[key.replace(rng.choice(["lora", "to_k", "to_q", "unet", "attn2", "."]), rng.choice(["x", "", "_", "lora_mid"]), 1)] = header.pop(key)
    elif kind in ("metadata", "metadata-json"):
        meta = header.setdefault("__metadata__", {})
        field = rng.choice(list(meta) + ["impasto.family", "impasto.style_suffix", "lora_adapter_metadata"]) if meta else "impasto.family"
        if kind == "metadata-json" and "lora_adapter_metadata" in meta:
            cfg = json.loads(meta["lora_adapter_metadata"])
            cfg[rng.choice(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "use_dora"])] = rng.choice(WEIRD)
            meta["lora_adapter_metadata"] = json.dumps(cfg)
        else:
            value = rng.choice(WEIRD + ["kv", "rank1", "lora", "style", "2", "<x>"])
            meta[field] = value if rng.random() < 0.8 or not isinstance(value, str) else value * 3
    else:
        header = rng.choice([[header], "header", 3, {"__metadata__": "x"}, {"x": [1, 2]}])
    return _join(header, rest, rng)


def mutate_bytes(data: bytes, rng) -> bytes:
    data = bytearray(data)
    kind = rng.choice(["flip", "flip", "truncate", "append", "zero"])
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i = rng.randrange(len(data))
        data[i:i + rng.randint(1, 256)] = b"\0" * len(data[i:i + 256])
    return bytes(data)


def mutate_config(text: str, rng) -> str:
    cfg = json.loads(text)
    cfg[rng.choice(["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "peft_type", "use_dora",
                    "target_modules"])] = rng.choice(WEIRD + [{"to_q": 1e9}, {"(": 2}, {"to_q": "x"}])
    return rng.choice([json.dumps(cfg), json.dumps(cfg)[:-3], "[1]", "{" * 5000])


def make_case(i: int, kind: str, seed_path: str, d, rng) -> str:
    """Write case i (a mutation of the seed file or folder) under d; return the path to register."""
    if os.path.isdir(seed_path):  # PEFT folder: mutate the config or the weights
        case = d / f"c{i}"
        case.mkdir()
        weights = open(os.path.join(seed_path, "adapter_model.safetensors"), "rb").read()
        config = open(os.path.join(seed_path, "adapter_config.json")).read()
        if rng.random() < 0.5:
            config = mutate_config(config, rng)
        else:
            weights = mutate_header(weights, rng) if rng.random() < 0.5 else mutate_bytes(weights, rng)
        (case / "adapter_model.safetensors").write_bytes(weights)
        (case / "adapter_config.json").write_text(config)
        return str(case)
    data = open(seed_path, "rb").read()
    name = os.path.basename(seed_path)
    if name.endswith(".safetensors") and rng.random() < 0.6:
        try:
            data = mutate_header(data, rng)
        except (ValueError, KeyError, TypeError, IndexError):
            data = mutate_bytes(data, rng)
    else:
        data = mutate_bytes(data, rng)
    folder = d / f"c{i}"
    folder.mkdir()
    path = folder / name
    path.write_bytes(data)
    return str(path)


# ------------------------------------------------------------------------------ the run

class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def request_for(eng, name):
    info = eng.adapters.info(name)
    tokens = " ".join(t for t, _ in info.token_map) or (info.token or "")
    kw = dict(seed=0, steps=1, height=16, width=16, output_type="np", timeout=CASE_SECONDS)
    if info.family == "style":
        return impasto.Request(f"a {tokens} star", guidance=impasto.Guidance(cfg=1.0, styles={name: 1.0}), **kw)
    return impasto.Request(f"a {tokens} star", adapters=[name], guidance=1.0, **kw)


@pytest.fixture(scope="module")
def fuzz_engine(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    eng = impasto.Engine.from_pretrained(tiny_dir, adapter_root=str(root), max_rank=8, host_cache_bytes=2**20)
    eng.adapters.compute_covariance(eng.base.tokenizer, eng.base.text_encoder,
                                    ["a photo of a star", "a red square", "a blue circle on grass", "a dog"])
    return eng, root


def test_mutation_fuzzer(fuzz_engine):
    eng, root = fuzz_engine
    files = seeds(eng, root / "seeds")
    for name, path in files.items():  # every seed is valid and serves
        eng.adapters.register(f"seed-{name}", path)
    outs = eng.generate_batch([request_for(eng, f"seed-{n}") for n in files])
    assert all(o.error is None for o in outs), [(n, o.error) for n, o in zip(files, outs) if o.error]
    for n in files:
        eng.adapters.unregister(f"seed-{n}")

    rng = random.Random(SEED)
    kinds = sorted(files)
    bad, outcomes = [], {"registered": 0, "refused": 0, "request error": 0}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    previous = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.perf_counter()
    pending = []

    def serve(group):
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            results = eng.generate_batch([request_for(eng, n) for n, _ in group])
        except CaseTimeout:
            bad.append((group, "generate timed out"))
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for (n, case), out in zip(group, results):
            if out.error is None:
                if not np.isfinite(np.asarray(out.images)).all():
                    bad.append((case, "served a non-finite image with error=None"))
            elif isinstance(out.error, ALLOWED):
                outcomes["request error"] += 1
            else:
                bad.append((case, f"request error {type(out.error).__name__}: {out.error}"))
            eng.adapters.unregister(n)

    try:
        for i in range(CASES):
            kind = kinds[i % len(kinds)]
            case = f"case {i} ({kind})"
            path = make_case(i, kind, files[kind], root, rng)
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                eng.adapters.register(f"c{i}", path)
                outcomes["registered"] += 1
                pending.append((f"c{i}", case))
            except CaseTimeout:
                bad.append((case, "registration timed out"))
            except impasto.AdapterError:
                outcomes["refused"] += 1
            except Exception as e:  # noqa: BLE001  (the point: none may escape)
                bad.append((case, f"registration raised {type(e).__name__}: {e}"))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if len(pending) == GROUP:
                serve(pending)
                pending = []
        if pending:
            serve(pending)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - t0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    print(f"fuzz: {CASES} cases in {elapsed:.1f} s, {outcomes}, peak RSS +{grown_mb:.0f} MB")
    assert not bad, bad[:10]
    assert outcomes["registered"] > CASES // 10 and outcomes["refused"] > CASES // 10, outcomes
    assert grown_mb < 2048
