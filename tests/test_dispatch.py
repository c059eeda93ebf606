"""The dispatch table: precedence of backend choices and the reasons a backend is rejected."""

import pytest
import torch

from impasto.kernels import dispatch
from impasto.kernels.dispatch import Backend, BackendNotSupportedError, not_supported_reasons, select, use_backend

OP = "_test_dispatch_op"


@pytest.fixture(autouse=True)
def _fake_op(monkeypatch):
    """A throwaway op with a reference and a triton implementation that record their calls."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls = []
    monkeypatch.setitem(dispatch._REGISTRY, OP, {})
    monkeypatch.setitem(dispatch._DTYPES, OP, {})
    dispatch.register(OP, "reference")(lambda: calls.append("reference"))
    dispatch.register(OP, "triton", dtypes=[torch.float32, torch.float16])(lambda: calls.append("triton"))
    return calls


def _run(device="cpu", dtype=torch.float32, backend=None):
    return dispatch.implementation(OP, select(OP, device, dtype, backend))()


def test_cpu_default_is_reference(_fake_op):
    assert dispatch.default_backend("cpu") is Backend.REFERENCE
    _run()
    assert _fake_op == ["reference"]


def test_precedence_argument_over_context_over_env(_fake_op, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    _run()  # env
    with use_backend("reference"):
        _run()  # context beats env
        with use_backend("triton"):
            _run()  # innermost context wins
        _run(backend="triton")  # argument beats context
    _run()  # context gone: env again
    assert _fake_op == ["triton", "reference", "triton", "triton", "triton"]


def test_context_manager_restores_on_error(_fake_op):
    with pytest.raises(KeyError):
        with use_backend("triton"):
            raise KeyError
    _run()
    assert _fake_op == ["reference"]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    assert not_supported_reasons(OP, "triton", "cpu") == []
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = not_supported_reasons(OP, "triton", "cpu")
    assert any("TRITON_INTERPRET=1" in r for r in reasons)
    with pytest.raises(BackendNotSupportedError) as err:
        _run(backend="triton")
    text = str(err.value)
    # every backend is listed with its reasons
    assert "reference: supported" in text
    assert "triton:" in text and "TRITON_INTERPRET=1" in text
    assert "native: " in text and f"no native implementation of {OP!r}" in text


def test_dtype_rejection_names_the_dtype(_fake_op):
    reasons = not_supported_reasons(OP, "triton", "cpu", torch.bfloat16)
    assert reasons and "bfloat16" in reasons[0] and "float16" in reasons[0]
    with pytest.raises(BackendNotSupportedError, match="bfloat16"):
        _run(dtype=torch.bfloat16, backend="triton")
    _run(dtype=torch.bfloat16)  # the default still runs it
    assert _fake_op == ["reference"]


def test_native_is_rejected_with_reasons(monkeypatch):
    reasons = not_supported_reasons(OP, "native", "cpu")
    assert any("no native implementation" in r for r in reasons)
    from impasto.kernels import native  # not loaded: that is a reason too, for every op

    monkeypatch.setitem(native._state, "origin", None)
    monkeypatch.setattr(native, "load", lambda: False)
    assert any("native extension is" in r for r in not_supported_reasons("lora_apply", "native", "cpu"))


def test_unknown_backend_names_the_known_ones(monkeypatch):
    with pytest.raises(BackendNotSupportedError, match="reference, triton, native"):
        _run(backend="cutlass")
    monkeypatch.setenv(dispatch.ENV_VAR, "cutlass")
    with pytest.raises(BackendNotSupportedError, match="'cutlass'"):
        _run()
    with pytest.raises(BackendNotSupportedError):
        with use_backend("cutlass"):
            pass


def test_lora_ops_are_registered_per_backend():
    for op in ("lora_apply", "lora_delta_backward"):
        assert not_supported_reasons(op, "reference", "cpu", torch.float64) == []
        assert not_supported_reasons(op, "triton", "cpu", torch.bfloat16) == []
        assert not_supported_reasons(op, "triton", "cpu", torch.float64) != []


def test_lora_apply_rejection_reaches_the_caller(monkeypatch):
    from impasto.kernels import lora_apply

    y, x = torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)
    A, B = torch.zeros(1, 4, 2), torch.zeros(1, 2, 3)
    slots, scales = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET"):
        lora_apply(y, x, A, B, slots, scales)
    lora_apply(y, x, A, B, slots, scales, backend="reference")  # an explicit argument still wins
    monkeypatch.delenv(dispatch.ENV_VAR)
    with use_backend("triton"):  # the context manager reaches the registered op
        with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET"):
            lora_apply(y, x, A, B, slots, scales)


def test_one_copy_of_the_package(tmp_path):
    """With the repo root on sys.path, `import kernels` (as transformers' probe for Hugging Face's
    `kernels` package does) must load no second copy of the ops, and transformers must still
    import (it treats the empty top-level module's version 0 as "not installed")."""
    import pathlib
    import subprocess
    import sys

    import impasto.kernels

    root = pathlib.Path(impasto.kernels.__file__).parents[1]
    code = (
        "import kernels; assert kernels.__all__ == [] and kernels.__version__ == '0'\n"
        "from transformers import CLIPTextModel\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "assert not is_kernels_available()\n"
        "import impasto.kernels, torch\n"
        "assert impasto.kernels is not kernels and hasattr(torch.ops.impasto, 'lora_apply_')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
