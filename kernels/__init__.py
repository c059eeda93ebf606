"""impasto.kernels: compute primitives (PyTorch references, Triton kernels, one dispatch table).

Nothing here imports from the engine (`impasto`): dependencies point one way.
"""

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
