"""`vitserve.json` as a typed, frozen object: what the service needs to know about one exported graph.

Format versions: 1 (vit-export before the format was typed: it also stored the version number, which is
ignored on reading) and 2 (today: the directory is the version). A reader refuses a format it does not know,
with a message that says why; a newer exporter's file is never half-understood.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from imageprep import DEFAULT_CROP_FRACTION, DEFAULT_INTERPOLATION

from .errors import InvalidMetadata, UnsupportedFormat
from .names import BATCH, LOGITS, METADATA_FORMAT, TASKS, Task

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1  # files without a "format_version" are the first format


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: uint8, float32, float16, int64
    shape: tuple[int, ...]  # BATCH (-1) for the dynamic batch axis

    @property
    def batched(self) -> bool:
        return bool(self.shape) and self.shape[0] == BATCH

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        return cls(str(data["name"]), str(data["dtype"]), tuple(int(d) for d in data["shape"]))


@dataclass(frozen=True)
class ImageInput:
    """What the graph's `images` input takes, and how a photo is brought to it (the evaluation resize)."""
    height: int
    width: int
    interpolation: str = DEFAULT_INTERPOLATION
    crop_fraction: float = DEFAULT_CROP_FRACTION  # shorter side to size / crop_fraction, then the centre crop

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def to_json(self) -> dict[str, Any]:
        return {"size": [self.height, self.width], "layout": "NHWC", "dtype": "uint8", "color": "RGB",
                "resize": {"interpolation": self.interpolation, "crop_fraction": self.crop_fraction}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ImageInput:
        height, width = (int(v) for v in data["size"])
        resize = data.get("resize") or {}
        return cls(height, width, str(resize.get("interpolation", cls.interpolation)),
                   float(resize.get("crop_fraction", cls.crop_fraction)))


@dataclass(frozen=True)
class Normalization:
    """mean/std of the pixels in [0, 1]; applied inside the graph (the service sends uint8)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "in_graph": True}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Normalization:
        return cls(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]))


@dataclass(frozen=True)
class Classification:
    labels: tuple[str, ...]  # index -> class name

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Embedding:
    dim: int
    pooling: str  # cls | gap | map

    def to_json(self) -> dict[str, Any]:
        return {"dim": self.dim, "pooling": self.pooling}


@dataclass(frozen=True)
class Reconstruction:
    default_mask_ratio: float
    norm_pix_loss: bool  # predictions are per-patch normalised
    patch_dim: int  # p * p * 3 values per predicted patch

    def to_json(self) -> dict[str, Any]:
        return {"default_mask_ratio": self.default_mask_ratio, "norm_pix_loss": self.norm_pix_loss, "patch_dim": self.patch_dim}


@dataclass(frozen=True)
class AttentionMaps:
    """A classifier's heat maps: `file` (beside the classifier's graph) takes the same `images` and answers `output`
    (B, grid rows, grid columns), by `method` ("rollout": attention rollout from the pooled token to each patch,
    summing to 1 over the patches), checked against PyTorch at export like every graph."""
    file: str
    output: TensorSpec
    method: str = "rollout"
    tolerance: float | None = None
    max_abs_diff_vs_torch: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "output": self.output.to_json(), "method": self.method, "tolerance": self.tolerance,
                "max_abs_diff_vs_torch": dict(self.max_abs_diff_vs_torch or {})}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttentionMaps:
        return cls(str(data["file"]), TensorSpec.from_json(data["output"]), str(data.get("method", cls.method)),
                   data.get("tolerance"), data.get("max_abs_diff_vs_torch"))


@dataclass(frozen=True)
class VariantRecord:
    """One graph file and how well it agreed at export: fp32 against PyTorch, the others against fp32."""
    file: str
    tolerance: Any = None
    max_abs_diff_vs_torch: Mapping[str, Any] | None = None
    agreement_vs_fp32: Mapping[str, Any] | None = None
    calibration: Mapping[str, Any] | None = None  # static int8: the images that set the activation ranges

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"file": self.file, "tolerance": self.tolerance}
        if self.max_abs_diff_vs_torch is not None:
            record["max_abs_diff_vs_torch"] = dict(self.max_abs_diff_vs_torch)
        if self.agreement_vs_fp32 is not None:
            record["agreement_vs_fp32"] = dict(self.agreement_vs_fp32)
        if self.calibration is not None:
            record["calibration"] = dict(self.calibration)
        return record

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VariantRecord:
        return cls(str(data["file"]), data.get("tolerance"), data.get("max_abs_diff_vs_torch"), data.get("agreement_vs_fp32"),
                   data.get("calibration"))


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    task: Task
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    image: ImageInput
    normalization: Normalization
    patch_size: int
    grid: tuple[int, int]
    classification: Classification | None = None  # task classify
    embedding: Embedding | None = None  # task embed
    reconstruction: Reconstruction | None = None  # task reconstruct
    attention: AttentionMaps | None = None  # classifiers exported with attention maps (older exports lack them)
    variants: Mapping[str, VariantRecord] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)  # provenance: checkpoint path, sha256, format, step
    exporter: Mapping[str, Any] = field(default_factory=dict)  # package versions and ONNX options
    created: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise InvalidMetadata(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        needed = {"classify": self.classification, "embed": self.embedding, "reconstruct": self.reconstruction}[self.task]
        if needed is None:
            raise InvalidMetadata(f"a {self.task} model's metadata lacks its {self.task} section")
        logits = [spec for spec in self.outputs if spec.name == LOGITS]
        if self.classification and logits and logits[0].shape[-1] != self.classification.num_classes:
            raise InvalidMetadata(f"{self.classification.num_classes} labels for {logits[0].shape[-1]} logits")

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)

    @property
    def default_keep(self) -> int:
        """Visible patches at the default mask ratio (reconstructors), counted as the MAE paper does."""
        ratio = self.reconstruction.default_mask_ratio if self.reconstruction else 0.0
        return max(1, int(self.num_patches * (1 - ratio)))

    # --- JSON ------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": METADATA_FORMAT, "format_version": FORMAT_VERSION, "name": self.name, "task": self.task,
            "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs],
            "image": self.image.to_json(), "normalization": self.normalization.to_json(),
            "patch_size": self.patch_size, "grid": list(self.grid), "num_patches": self.num_patches,
            "labels": list(self.classification.labels) if self.classification else None,
            "num_classes": self.classification.num_classes if self.classification else None,
            "embedding": self.embedding.to_json() if self.embedding else None,
            "reconstruction": self.reconstruction.to_json() if self.reconstruction else None,
            "attention": self.attention.to_json() if self.attention else None,
            "variants": {kind: record.to_json() for kind, record in self.variants.items()},
            "source": dict(self.source), "exporter": dict(self.exporter), "created": self.created,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: Any) -> ModelMetadata:
        """Parse and check; raises UnsupportedFormat or InvalidMetadata with the reason."""
        if not isinstance(data, Mapping) or data.get("format") != METADATA_FORMAT:
            raise UnsupportedFormat(f"not vitserve model metadata (no \"format\": \"{METADATA_FORMAT}\" marker)")
        version = data.get("format_version", LEGACY_FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < LEGACY_FORMAT_VERSION:
            raise UnsupportedFormat(f"unknown metadata format_version {version!r}")
        if version > FORMAT_VERSION:
            raise UnsupportedFormat(f"metadata format_version {version} was written by a newer vit-export; "
                                    f"this vitserve reads format versions up to {FORMAT_VERSION}: upgrade vitserve")
        try:
            return cls._parse(data)
        except InvalidMetadata:
            raise
        except KeyError as missing:
            raise InvalidMetadata(f"metadata lacks {missing}") from None
        except (TypeError, ValueError) as error:
            raise InvalidMetadata(f"malformed metadata: {error}") from None

    @classmethod
    def _parse(cls, data: Mapping[str, Any]) -> ModelMetadata:
        task = data["task"]
        classification = embedding = reconstruction = None
        if task == "classify":
            count = data.get("num_classes")
            labels = data.get("labels") or [str(i) for i in range(int(count))]
            classification = Classification(tuple(str(label) for label in labels))
        elif task == "embed":
            embedding = Embedding(int(data["embedding"]["dim"]), str(data["embedding"]["pooling"]))
        elif task == "reconstruct":
            section = data["reconstruction"]
            reconstruction = Reconstruction(float(section["default_mask_ratio"]), bool(section["norm_pix_loss"]),
                                            int(section["patch_dim"]))
        grid = tuple(int(v) for v in data["grid"])
        if len(grid) != 2:
            raise InvalidMetadata(f"grid must be [rows, columns], got {data['grid']}")
        return cls(
            name=str(data["name"]), task=task,
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            image=ImageInput.from_json(data["image"]), normalization=Normalization.from_json(data["normalization"]),
            patch_size=int(data["patch_size"]), grid=grid,
            classification=classification, embedding=embedding, reconstruction=reconstruction,
            attention=AttentionMaps.from_json(data["attention"]) if data.get("attention") else None,
            variants={kind: VariantRecord.from_json(v) for kind, v in (data.get("variants") or {}).items()},
            source=dict(data.get("source") or {}), exporter=dict(data.get("exporter") or {}),
            created=str(data.get("created") or ""),
        )

    @classmethod
    def loads(cls, text: str) -> ModelMetadata:
        try:
            data = json.loads(text)
        except ValueError as error:
            raise InvalidMetadata(f"not JSON: {error}") from None
        return cls.from_json(data)
