"""Request parameters and response bodies (pydantic): they validate input and document the API in OpenAPI."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _index_list(value: Any) -> Any:
    """Form and query fields carry lists as '0,1,2'; JSON carries real lists."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return []
        try:
            return [int(part) for part in value.split(",")]
        except ValueError as error:
            raise ValueError("must be patch indices, e.g. 0,1,2") from error
    return value


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, description="model name, when the repository holds several for this task "
                               "(GET /models lists them; default: the first by name)")
    version: int | None = Field(None, ge=1, description="model version, when the server serves several (default: the "
                                "newest it serves)", examples=[1])
    timeout_ms: int | None = Field(None, ge=1, description="deadline for this request; at most the server's default",
                                   examples=[2000])


class ClassifyParams(CommonParams):
    top_k: int = Field(5, ge=1, description="labels to return per image", examples=[3])
    attention: bool = Field(False, description="also where the model looked: per image, an attention-rollout heat map "
                            "over the patch grid (rows of floats summing to 1). Runs a second graph: off by default; "
                            "refused (422) for a model exported without it", examples=[True])
    attention_png: bool = Field(False, description="also the heat map drawn over the upload, as a base64 PNG (longer "
                                "side at most 2048); implies attention", examples=[True])

    @property
    def wants_attention(self) -> bool:
        return self.attention or self.attention_png


class EmbedParams(CommonParams):
    normalize: bool = Field(True, description="L2-normalise each embedding", examples=[False])


class ReconstructParams(CommonParams):
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="share of patches hidden from the encoder", examples=[0.5])
    seed: int | None = Field(None, ge=0, description="makes the random mask reproducible", examples=[0])
    visible: list[int] | None = Field(None, description="patch indices to keep visible (row-major); instead of mask_ratio",
                                      examples=[[0, 1, 2, 3]])
    masked: list[int] | None = Field(None, description="patch indices to hide, the rest stays visible; instead of mask_ratio",
                                     examples=[[5, 6, 9, 10]])
    size: Literal["model", "input"] = Field("model", description="pictures at the model's input size, or drawn over "
                                            "the upload at its own size (longer side at most 2048): the region the "
                                            "model saw holds the upscaled reconstruction, the rest is faded",
                                            examples=["input"])

    _lists = field_validator("visible", "masked", mode="before")(_index_list)

    @model_validator(mode="after")
    def _one_way_to_mask(self) -> ReconstructParams:
        """An explicit patch set and a mask ratio contradict each other: refuse rather than silently pick one."""
        chosen = [name for name in ("visible", "masked", "mask_ratio") if name in self.model_fields_set
                  and getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give one of 'visible', 'masked' or 'mask_ratio', not {' and '.join(repr(c) for c in chosen)}")
        return self


class JsonImages(BaseModel):
    """A JSON request: base64 images (or data URLs) plus the endpoint's parameters."""
    model_config = ConfigDict(extra="allow")
    images: list[str] = Field(..., description="base64-encoded image files")


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class ClassifyResult(BaseModel):
    predictions: list[Prediction]
    attention: list[list[float]] | None = Field(None, description="with attention=true: the heat map, one row of "
                                                "floats per patch row (row-major, like the patch grid), summing to 1")
    attention_png: str | None = Field(None, description="with attention_png=true: base64 PNG of the heat map over "
                                      "the upload (the region the model saw; the rest faded)")


class ClassifyResponse(BaseModel):
    model: str
    version: int
    results: list[ClassifyResult]

    model_config = ConfigDict(json_schema_extra={"example": {
        "model": "demo-classifier", "version": 1,
        "results": [{"predictions": [{"label": "circle", "index": 0, "score": 0.97}, {"label": "square", "index": 1, "score": 0.02}]}],
    }})


class EmbedResponse(BaseModel):
    model: str
    version: int
    dim: int
    pooling: str
    normalized: bool
    embeddings: list[list[float]]

    model_config = ConfigDict(json_schema_extra={"example": {
        "model": "demo-mae-embed", "version": 1, "dim": 128, "pooling": "cls", "normalized": True, "embeddings": [[0.01, -0.12, 0.33]],
    }})


class ReconstructResult(BaseModel):
    masked_png: str = Field(description="base64 PNG: the input with masked patches grey")
    reconstruction_png: str = Field(description="base64 PNG: every patch as the decoder predicted it")
    composite_png: str = Field(description="base64 PNG: visible patches from the input, masked ones reconstructed. At "
                               "the model's input size unless size=input: the model sees only the centre crop of the "
                               "upload, resized, so an upscaled reconstruction adds no detail the model predicted")
    mask: list[int] = Field(description="per patch, row-major: 1 = masked (reconstructed), 0 = visible")
    mse: float = Field(description="mean squared error over the masked patches, in the model's target space")


class ReconstructResponse(BaseModel):
    model: str
    version: int
    grid: list[int]
    patch_size: int
    visible_patches: int
    results: list[ReconstructResult]


class ErrorBody(BaseModel):
    type: str
    message: str
    index: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
