"""The error hierarchy. Every message names the file, key or field that is wrong."""


class ImpastoError(Exception):
    """Base class of every error impasto raises on purpose."""


class ModelLoadError(ImpastoError):
    """A base-model folder or one of its components is missing or malformed."""


class RequestError(ImpastoError):
    """A request is malformed: a bad field, too many adapters, a bad scale."""


class AdapterError(ImpastoError):
    """An adapter cannot be registered, loaded or applied."""


class AdapterFormatError(AdapterError):
    """The file is not a readable adapter: truncated, corrupt, foreign keys or layout."""


class AdapterNotFoundError(AdapterFormatError):
    """The adapter's file or folder does not exist."""


class AdapterPathError(AdapterError):
    """The adapter's path resolves outside the engine's adapter_root (`../`, a symlink out)."""


class AdapterUnsupportedError(AdapterFormatError):
    """The file is a real adapter of a kind impasto refuses by name (DoRA, LoHa, 3x3-conv LoRA...)."""


class AdapterShapeError(AdapterError):
    """The adapter's tensors do not fit this base model (wrong shape, target or base)."""


class AdapterValueError(AdapterError):
    """The adapter's values are unusable: NaN/Inf, wrong dtype, rank above max_rank."""


class AdapterNameError(AdapterError):
    """Unknown or duplicate adapter name, or a placeholder token no adapter defines."""


class RequestFailedError(ImpastoError):
    """A request failed for a reason that is not one of the errors above (a library error, an
    allocation failure); the message names the request and the stage, `__cause__` is the cause."""


class RequestTimeoutError(ImpastoError):
    """The request ran past its `Request.timeout` (queued or running)."""


class RequestCancelledError(ImpastoError):
    """The request was cancelled through `Job.cancel()` (or its asyncio task was)."""


class NumericalError(ImpastoError):
    """The request's final latents hold NaN or Inf (instead of returning a black image)."""


class EngineBusyError(ImpastoError):
    """The engine's queue is full (`max_queue`); retry later."""


class EngineClosedError(ImpastoError):
    """The engine was closed; it takes no more requests."""
