"""impasto.kernels: compute primitives (PyTorch references, Triton kernels, one dispatch table).

Nothing here imports from the engine (`impasto`): dependencies point one way.
"""

import importlib
import sys

if __name__ != "impasto.kernels":
    # Imported as top-level `kernels`: with the repository root on sys.path (`python -m pytest`
    # run from it), transformers and diffusers probe for Hugging Face's `kernels` package and
    # import this folder instead. A second copy would re-register the torch.library ops with its
    # own dispatch state (use_backend on one copy would not reach the ops of the other), so the
    # name is pointed at the one real package.
    sys.modules[__name__] = importlib.import_module("impasto.kernels")
else:
    from . import dispatch
    from .dispatch import Backend, BackendNotSupportedError, not_supported_reasons, use_backend
    from .lora import LoraMeta, lora_apply, lora_delta, lora_delta_ref, lora_meta

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "LoraMeta",
    "dispatch",
    "lora_apply",
    "lora_delta",
    "lora_delta_ref",
    "lora_meta",
    "not_supported_reasons",
    "use_backend",
]
