"""impasto.kernels: compute primitives (PyTorch references, Triton kernels, one dispatch table).

Nothing here imports from the engine (`impasto`): dependencies point one way.
"""
