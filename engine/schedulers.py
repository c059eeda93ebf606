"""Schedulers by name: diffusers class names and AUTOMATIC1111 sampler names, one table.

Every request builds its own scheduler instance from the base model's scheduler config
(`Engine` never shares a stateful scheduler between requests), so requests with different
samplers share each UNet forward: the worker steps each one with its own instance.

The A1111 names follow diffusers' own mapping (docs, "Schedulers" overview, "A1111 / k-diffusion
-> diffusers"); A1111 samplers that diffusers has no equivalent for (DPM++ 2S a, DPM fast, DPM
adaptive, Restart) raise a RequestError naming the names that exist. The diffusers table maps
"DPM++ SDE" to DPMSolverSinglestepScheduler (A1111 runs k-diffusion's stochastic sampler there;
diffusers' DPMSolverSDEScheduler needs torchsde, which impasto does not depend on).
"""

from __future__ import annotations

from .errors import RequestError

# A1111 sampler name -> (diffusers class name, config overrides)
A1111 = {
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM++ SDE": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "LCM": ("LCMScheduler", {}),
    "TCD": ("TCDScheduler", {}),
}

# diffusers classes a request may name directly (the ones above; all are SD-epsilon schedulers)
CLASSES = sorted({cls for cls, _ in A1111.values()})


def resolve(name: str) -> tuple[str, dict]:
    """Semantics: a sampler name -> (diffusers class name, config overrides).

    `name` is an A1111 sampler name (case-insensitive: "euler a", "DPM++ 2M Karras") or a
    diffusers class name ("EulerAncestralDiscreteScheduler"); anything else is a RequestError
    that lists the accepted names.
    """
    if not isinstance(name, str):
        raise RequestError(f"scheduler: expected a sampler or diffusers scheduler class name, got {name!r}")
    if name in CLASSES:
        return name, {}
    by_lower = {k.lower(): v for k, v in A1111.items()}
    if name.strip().lower() in by_lower:
        cls, overrides = by_lower[name.strip().lower()]
        return cls, dict(overrides)
    raise RequestError(f"scheduler: unknown sampler {name!r}; A1111 names: {', '.join(A1111)}; "
                       f"diffusers classes: {', '.join(CLASSES)}")


def build(name: str | None, config, default=None):
    """A fresh scheduler: `default`'s own class when `name` is None, else `resolve(name)`'s,
    always from the base model's scheduler `config` plus the name's overrides (as
    `Cls.from_config(pipe.scheduler.config, **overrides)` does in diffusers)."""
    import diffusers

    if name is None:
        return type(default).from_config(config)
    cls, overrides = resolve(name)
    return getattr(diffusers, cls).from_config(config, **overrides)


def a1111_name(scheduler) -> str:
    """The A1111 sampler name of a scheduler instance (its class name when A1111 has none)."""
    cls, cfg = type(scheduler).__name__, scheduler.config
    best = cls
    for a1111, (c, overrides) in A1111.items():
        if c == cls and all(cfg.get(k) == v for k, v in overrides.items()):
            if best == cls or len(overrides) > len(A1111.get(best, ("", {}))[1]):
                best = a1111
    return best
