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
    from .guidance import BranchTable, RequestBranches, build_branch_table, guidance_blend, guidance_blend_ref
    from .lora import LoraMeta, lora_apply, lora_delta, lora_delta_ref, lora_meta
    from .rank1 import rank1_edit, rank1_edit_ref

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "BranchTable",
    "LoraMeta",
    "build_branch_table",
    "dispatch",
    "guidance_blend",
    "guidance_blend_ref",
    "lora_apply",
    "lora_delta",
    "lora_delta_ref",
    "lora_meta",
    "not_supported_reasons",
    "RequestBranches",
    "rank1_edit",
    "rank1_edit_ref",
    "use_backend",
]
