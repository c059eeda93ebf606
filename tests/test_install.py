"""The package installs as ONE namespace, `impasto`, with its data; no top-level engine/kernels."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), ROOT],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return target


def test_one_namespace(installed):
    top = {n for n in os.listdir(installed) if not n.endswith((".dist-info", ".egg-info")) and n != "bin"}
    assert top == {"impasto"}, top
    assert os.path.isfile(installed / "impasto" / "kernels" / "__init__.py")
    assert os.path.isfile(installed / "impasto" / "tiny" / "tokenizer" / "vocab.json")
    assert os.path.isfile(installed / "impasto" / "tiny" / "tokenizer" / "merges.txt")
    assert os.path.isfile(installed / "impasto" / "configs" / "sd-v1" / "unet" / "config.json")  # single files


def test_installed_copy_imports(installed):
    code = "import impasto, impasto.kernels; print(impasto.__file__); print(impasto.kernels.__file__)"
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=env, cwd=str(installed)).stdout.split()
    assert out[0].startswith(str(installed)) and out[1].startswith(str(installed))
    for name in ("engine", "kernels"):
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, env=env, cwd=str(installed))
        assert r.returncode != 0, f"a top-level {name!r} module is importable"
