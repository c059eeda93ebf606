"""impasto: serve many personalized text-to-image adapters in one batched diffusion forward.

    import impasto
    engine = impasto.Engine.from_pretrained("tiny")
    out = engine.generate("a red star on a blue background", steps=25, seed=0)
    out.images[0].save("star.png")
"""

from .api import Adapter, AdapterInfo, GenerationOutput, Guidance, Request
from .engine import LIMITS, Engine
from .worker import Job
from .errors import (
    AdapterError,
    AdapterFormatError,
    AdapterNameError,
    AdapterNotFoundError,
    AdapterPathError,
    AdapterShapeError,
    AdapterUnsupportedError,
    AdapterValueError,
    EngineBusyError,
    EngineClosedError,
    ImpastoError,
    ModelLoadError,
    NumericalError,
    RequestCancelledError,
    RequestError,
    RequestFailedError,
    RequestTimeoutError,
)

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterFormatError",
    "AdapterInfo",
    "AdapterNameError",
    "AdapterNotFoundError",
    "AdapterPathError",
    "AdapterShapeError",
    "AdapterUnsupportedError",
    "AdapterValueError",
    "Engine",
    "EngineBusyError",
    "EngineClosedError",
    "GenerationOutput",
    "Guidance",
    "ImpastoError",
    "Job",
    "LIMITS",
    "ModelLoadError",
    "NumericalError",
    "Request",
    "RequestCancelledError",
    "RequestError",
    "RequestFailedError",
    "RequestTimeoutError",
]
