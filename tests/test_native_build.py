"""The native extension's build: every .cu compiles for sm_80 and sm_90 with nvcc (on machines
without a GPU too, so the CUDA code cannot rot unseen), the CUDA bindings compile against
torch's headers, and setup.py builds the extension only when asked."""

import glob
import os
import runpy
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
from torch.utils import cpp_extension

from impasto.kernels import native

ROOT = native.ROOT
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
NVCC = shutil.which("nvcc") or (os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None)
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _need_nvcc():
    if NVCC is None or not os.path.exists(NVCC):
        pytest.fail("nvcc not found: the CUDA compile checks need it (CUDA_HOME or PATH)")


def test_every_cuda_family_has_a_cu_file():
    assert {os.path.basename(f) for f in CU_FILES} == {"lora_cuda.cu", "guidance_cuda.cu", "rank1_cuda.cu"}


def _cuda_include() -> str:
    include = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include")
    if not os.path.isfile(os.path.join(include, "cuda_runtime.h")):
        include = os.path.join(cpp_extension.CUDA_HOME or "/usr/local/cuda", "include")
    return include


@pytest.fixture(scope="module")
def compiles(tmp_path_factory):
    """Every compile check, started at once (they are independent), as name -> Popen."""
    _need_nvcc()
    tmp = tmp_path_factory.mktemp("native_compile")
    jobs = {}
    for path in CU_FILES:
        cmd = [NVCC, "-c", "-std=c++17", "-O3", "-fmad=false", "-Werror", "all-warnings", *ARCHS, path,
               "-o", str(tmp / (os.path.basename(path) + ".o"))]
        jobs[os.path.basename(path)] = cmd
    # bindings/ops_cuda.cpp is compiled by g++ in a CUDA build; here it is syntax-checked with the
    # toolkit's headers. A CPU torch lacks one header that torch generates only for CUDA builds
    # (c10/cuda/impl/cuda_cmake_macros.h): an empty stand-in is enough for c10/cuda's streams.
    stub = tmp / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-isystem", str(tmp / "stub")]
    for p in cpp_extension.include_paths():
        cmd += ["-isystem", p]
    cmd += ["-isystem", _cuda_include(), "-isystem", sysconfig.get_paths()["include"],
            os.path.join(ROOT, "bindings", "ops_cuda.cpp")]
    jobs["ops_cuda.cpp"] = cmd
    procs = {name: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name, c in jobs.items()}
    yield procs, tmp
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def _wait(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_file_compiles_for_sm80_and_sm90(path, compiles):
    procs, tmp = compiles
    _wait(procs[os.path.basename(path)])
    assert (tmp / (os.path.basename(path) + ".o")).stat().st_size > 0


def test_cuda_bindings_compile_against_torch_headers(compiles):
    _wait(compiles[0]["ops_cuda.cpp"])


def _setup_kwargs(monkeypatch, build_native: bool) -> dict:
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    if build_native:
        monkeypatch.setenv("IMPASTO_BUILD_NATIVE", "1")
    else:
        monkeypatch.delenv("IMPASTO_BUILD_NATIVE", raising=False)
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup")
    return captured


def test_setup_builds_native_only_when_asked(monkeypatch):
    plain = _setup_kwargs(monkeypatch, build_native=False)
    assert plain["ext_modules"] == [] and plain["cmdclass"] == {}
    kw = _setup_kwargs(monkeypatch, build_native=True)
    (ext,) = kw["ext_modules"]
    assert ext.name == "impasto._native" and "build_ext" in kw["cmdclass"]
    want = {os.path.relpath(f, ROOT) for f in native.sources(cuda=native.cuda_buildable()[0])}
    assert set(ext.sources) == want
    assert "-ffp-contract=off" in ext.extra_compile_args["cxx"]


def test_a_cuda_home_without_headers_is_not_buildable(monkeypatch, tmp_path):
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there gives a folder
    without the toolkit: the CUDA part is then not buildable, with the reason, instead of a
    compiler error deep in the build."""
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    ok, why = native.cuda_buildable()
    assert not ok and str(tmp_path) in why and "cuda_runtime.h" in why
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert native.cuda_buildable() == (True, "")


def test_loader_reports_a_missing_library(monkeypatch, tmp_path):
    """IMPASTO_NATIVE_LIB naming no file is a reason, not an import error (in a fresh process)."""
    code = (
        "import impasto.kernels as k; print(k.native.load()); "
        "print(k.dispatch.not_supported_reasons('lora_apply', 'native', 'cpu'))"
    )
    env = dict(os.environ, IMPASTO_NATIVE_LIB=str(tmp_path / "nope.so"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    if native._setup_spec():  # the setup.py build is found first, whatever the variable says
        assert res.stdout.startswith("True")
    else:
        assert "False" in res.stdout and "is not a file" in res.stdout
