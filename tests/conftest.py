"""Test session setup.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before the
kernel modules are imported by any test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A randomly initialized SD-layout diffusers folder (fixed seed), float32."""
    from impasto.tiny import build_random_model

    return build_random_model(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="session")
def engine(tiny_dir):
    import impasto

    return impasto.Engine.from_pretrained(tiny_dir, device="cpu")


@pytest.fixture
def pipe(tiny_dir):
    """diffusers' own pipeline on the same folder: the reference every engine feature must equal."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def pytest_configure(config):
    """CI prints the 20 slowest tests (the README's test command stays plain `pytest -q tests`)."""
    if config.option.durations is None:
        config.option.durations = 20
    config.addinivalue_line("markers", "cuda: needs a CUDA device (runs wherever torch sees one)")
