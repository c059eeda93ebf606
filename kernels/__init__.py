"""impasto.kernels: compute primitives (PyTorch references, Triton kernels, one dispatch table).

Nothing here imports from the engine (`impasto`): dependencies point one way.
"""

if __name__ != "impasto.kernels":
    # Imported as top-level `kernels`: with the repository root on sys.path (`python -c`/`-m`
    # run from it), transformers and diffusers probe for Hugging Face's `kernels` package by that
    # name and import this folder. Stay an empty module whose version (0) is below any they
    # accept: they then treat `kernels` as absent, and no op is registered twice. (Importing
    # impasto from here would be circular: impasto imports transformers.)
    __version__ = "0"
    __all__ = []
else:
    from . import dispatch
    from .dispatch import Backend, BackendNotSupportedError, not_supported_reasons, use_backend
    from .guidance import BranchTable, RequestBranches, build_branch_table, guidance_blend, guidance_blend_ref
    from .lora import LoraMeta, lora_apply, lora_delta, lora_delta_ref, lora_meta
    from .rank1 import rank1_edit, rank1_edit_ref
    from . import native  # registers the native backend's entries (the library loads on demand)

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
        "native",
        "not_supported_reasons",
        "RequestBranches",
        "rank1_edit",
        "rank1_edit_ref",
        "use_backend",
    ]
