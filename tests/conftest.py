"""Test session setup.

TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here, before the
kernel modules are imported by any test.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
