"""Request and response bodies (pydantic): what /docs shows and what FastAPI validates.

Unknown fields are ignored, as OpenAI and A1111 clients send many (model, quality, script_args);
fields impasto knows but cannot honour yet are refused with 422 by the app, never ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class AdapterRef(BaseModel):
    """One adapter of a request. `start`/`end` (fractions of the steps) are the step-scheduled
    adapters of a later issue: sent today they are refused with 422."""

    name: str
    scale: float = 1.0
    start: Optional[float] = None
    end: Optional[float] = None


class StyleRef(BaseModel):
    """A Pair Customization style adapter and its guidance weight."""

    name: str
    weight: float = 1.0


class ImageGenerationRequest(BaseModel):
    """OpenAI's `POST /v1/images/generations` body plus the extensions other open servers take."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    n: int = Field(1, ge=1, description="images; image i uses seed + i")
    size: Optional[str] = Field(None, description='"WxH" or "auto" (the model\'s native size)')
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Optional[str] = None
    user: Optional[str] = None
    negative_prompt: Optional[str] = None
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = 7.5
    seed: Optional[int] = Field(None, ge=0, description="seed of the first image; random when absent")
    adapters: Optional[list[AdapterRef]] = None
    loras: Optional[list[AdapterRef]] = Field(None, description="vLLM-Omni's name for `adapters`")
    styles: Optional[list[StyleRef]] = None
    image: Optional[str] = Field(None, description="base64 init image (img2img: not supported yet; an encoder "
                                 "adapter's reference goes in ip_adapter_image)")
    ip_adapter_image: Optional[Union[str, list[str]]] = Field(
        None, description="base64 reference image(s) for the request's encoder adapter (diffusers' name)")
    timeout: Optional[float] = Field(None, gt=0, description="seconds; past it the request fails with 504")


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: Optional[str] = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


class Txt2ImgRequest(BaseModel):
    """A1111's `POST /sdapi/v1/txt2img` body (the fields impasto serves; the rest is ignored
    unless it changes the image, then refused). `prompt` may also be a list: one per image."""

    model_config = ConfigDict(extra="ignore")

    prompt: Union[str, list[str]] = ""
    negative_prompt: Union[str, list[str]] = ""
    seed: int = Field(-1, ge=-1, description="-1: random")
    steps: int = Field(50, ge=1)
    cfg_scale: float = 7.0
    width: Optional[int] = Field(None, ge=1)
    height: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None
    scheduler: Optional[str] = Field(None, description='"Automatic" or "Karras" (A1111 1.9\'s schedule type)')
    override_settings: Optional[dict] = Field(None, description="CLIP_stop_at_last_layers (clip skip) is read; "
                                                                "other settings are ignored")
    enable_hr: bool = False
    subseed_strength: float = 0.0
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    send_images: bool = True


class Txt2ImgResponse(BaseModel):
    images: list[str]
    parameters: dict
    info: str


class ErrorBody(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobCreated(BaseModel):
    id: str


class Progress(BaseModel):
    step: int
    total: int


class JobStatus(BaseModel):
    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    created: int
    result: Optional[ImageGenerationResponse] = None
    error: Optional[ErrorBody] = None


class AdapterOut(BaseModel):
    """What the store knows of a registered adapter (from its file header)."""

    name: str
    family: str
    format: str
    rank: int
    nbytes: int
    token: Optional[str] = None
    suffix: Optional[str] = None



class AdapterList(BaseModel):
    data: list[AdapterOut]
