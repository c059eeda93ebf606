"""impasto: one batched engine for personalized text-to-image diffusion.

`pip install .` installs pure Python and needs no compiler. The optional native extension
(csrc/ + bindings/) is built only when IMPASTO_BUILD_NATIVE=1: its CPU part with the C++
compiler, its CUDA part too where torch has CUDA and a CUDA toolkit is found.
"""

import os

from setuptools import setup


def _packages(root, prefix):
    """Map every package folder under `root` to a dotted name under `prefix`."""
    names = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        if "__init__.py" in files:
            rel = os.path.relpath(folder, root)
            name = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
            names[name] = folder
    return names


# The native extension's flags, as kernels/native.py's JIT build uses them: -ffp-contract=off
# keeps the guidance blend's rounding PyTorch's (no implied FMA); -fmad=false likewise on CUDA.
NATIVE_CXX_FLAGS = ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp-simd"]
NATIVE_NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-gencode", "arch=compute_80,code=sm_80",
                     "-gencode", "arch=compute_90,code=sm_90"]


def _native_sources(cuda):
    """csrc/*.cpp + bindings/ops.cpp; with cuda also csrc/*.cu + bindings/ops_cuda.cpp."""
    cpp = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    files = cpp + [os.path.join("bindings", "ops.cpp")]
    if cuda:
        files += sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cu"))
        files += [os.path.join("bindings", "ops_cuda.cpp")]
    return files


def _native_extensions():
    """impasto._native when IMPASTO_BUILD_NATIVE=1: the CPU part always (g++), the CUDA part where
    torch has CUDA and a toolkit is found. torch must be importable at build time, so install with
    `IMPASTO_BUILD_NATIVE=1 pip install --no-build-isolation -e .`."""
    if os.environ.get("IMPASTO_BUILD_NATIVE") != "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    flags = {"cxx": list(NATIVE_CXX_FLAGS)}
    # the same test as impasto.kernels.native.cuda_buildable (a CUDA_HOME guessed from a wrapper
    # nvcc may lack the toolkit's headers)
    if torch.version.cuda is not None and CUDA_HOME and os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime.h")):
        flags["nvcc"] = list(NATIVE_NVCC_FLAGS)
        ext = CUDAExtension("impasto._native", _native_sources(cuda=True), extra_compile_args=flags)
    else:
        ext = CppExtension("impasto._native", _native_sources(cuda=False), extra_compile_args=flags)
    return [ext], {"build_ext": BuildExtension}


package_dir = {**_packages("engine", "impasto"), **_packages("kernels", "impasto.kernels")}
ext_modules, cmdclass = _native_extensions()

setup(
    name="impasto",
    version="0.1.0",
    description="Serve many personalized text-to-image adapters in one batched diffusion forward",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(package_dir),
    package_dir=package_dir,
    package_data={"impasto.tiny": ["tokenizer/*", "model/**/*"], "impasto": ["configs/**/*"]},
    install_requires=[
        "torch==2.13.0",
        "triton==3.7.1",
        "numpy>=2.0",
        "diffusers==0.42.1",
        "transformers==5.23.0",
        "safetensors>=0.8.0",
        "tqdm>=4.66",
        "Pillow>=10",
    ],
    extras_require={
        "test": ["pytest==9.2.0", "pytest-benchmark==5.3.1", "peft==0.21.2", "accelerate==1.15.0",
                 "httpx==0.28.1", "selenium==4.51.0"],
        "xformers": ["xformers==0.0.35"],
        "bench": ["matplotlib==3.11.2"],  # benchmarks' plots only (bench_pair_quality.py)
        "serve": ["fastapi==0.163.2", "starlette==1.10.0", "uvicorn==0.54.0", "pydantic==2.14.4",
                  "prometheus-client==0.26.0", "python-multipart==0.0.34"],
        "ray": ["ray[serve]==2.60.0", "fastapi==0.163.2", "starlette==1.10.0", "uvicorn==0.54.0",
                "pydantic==2.14.4", "prometheus-client==0.26.0", "python-multipart==0.0.34"],  # impasto.serve.ray
        "bench": ["matplotlib==3.11.2"],  # benchmarks' plots only (bench_perfusion.py's Pareto PNG)
    },
    entry_points={"console_scripts": ["impasto=impasto.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
