"""Checkpoints: our own format, and loading public ViT / MAE weights into our models.

Our format stores the weights with the config that built them, the labels and the
input normalisation, and loads back exactly as saved. Foreign weights (timm, the
official MAE release, Hugging Face; converted in `importers.py`) reveal most of the
config by their shapes; the rest comes from, first to last: the caller's overrides,
the Hugging Face config.json beside the weights, the preset, the usual defaults.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .importers import (
    FORMAT, MAE_FIELDS, PRESET_CHECKED, SOURCES, VIT_FIELDS, CheckpointError, check_agrees, convert, detect_source, few,
    hf_config_settings, parse_size, preset_config, resolve_config,
)
from .data import IMAGENET_MEAN, IMAGENET_STD
from .mae import MaskedAutoencoder
from .presets import ConfigError, MAEConfig, ViTConfig
from .vit import VisionTransformer

__all__ = [
    "CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "import_checkpoint",
    "detect_source", "IMAGENET_MEAN", "IMAGENET_STD", "FORMAT", "FORMAT_VERSION",
]

FORMAT_VERSION = 1

_META_FIELDS = frozenset({"labels", "mean", "std"})


@dataclass
class LoadedCheckpoint:
    model: nn.Module  # VisionTransformer or MaskedAutoencoder, eval mode
    kind: str  # vit | mae
    labels: list[str] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    step: int
    source: str  # vitserve | timm | mae | hf
    training: dict | None  # optimizer / scheduler state saved by the trainer (our format only)


# --- our format -------------------------------------------------------------------

def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    labels: list[str] | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    step: int = 0,
    training: dict | None = None,
) -> None:
    """Write `model` with its config and metadata; atomic, and loadable with torch.load(weights_only=True)."""
    model = _unwrap(model)
    if isinstance(model, MaskedAutoencoder):
        kind, num_classes = "mae", 0
    elif isinstance(model, VisionTransformer):
        kind, num_classes = "vit", model.config.num_classes
    else:
        raise CheckpointError(f"can only save a VisionTransformer or MaskedAutoencoder, got {type(model).__name__}")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "config": model.config.to_dict(),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "labels": _labels(labels, num_classes),
        "mean": list(_triple(mean, "mean")),
        "std": list(_triple(std, "std")),
        "step": int(step),
        "training": training,
    }
    _check_storable(training, "training")
    _write_atomically(payload, Path(path))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None)
        inner = inner if isinstance(inner, nn.Module) else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# Exactly the types torch.load(weights_only=True) accepts (subclasses such as numpy.float64 are refused).
_STORABLE = (type(None), bool, int, float, complex, str, bytes, torch.device, torch.dtype)


def _check_storable(value: Any, where: str) -> None:
    """Fail at save time, naming the culprit, rather than when the checkpoint is loaded."""
    if type(value) in _STORABLE or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple, set, torch.Size):
        for index, item in enumerate(value):
            _check_storable(item, f"{where}[{index}]")
    elif type(value) in (dict, OrderedDict):
        for key, item in value.items():
            _check_storable(key, f"{where} key {key!r}")
            _check_storable(item, f"{where}[{key!r}]")
    else:
        raise CheckpointError(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which torch.load(weights_only=True) "
            "refuses; store plain numbers, strings, lists, dicts and tensors"
        )


def _write_atomically(payload: dict, path: Path) -> None:
    """Write beside the target, then rename: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_own(state: Mapping, preset: str | None, overrides: dict[str, Any]) -> LoadedCheckpoint:
    """Our format: exactly the saved config (plus any overrides), no guessing."""
    if state.get("format") != FORMAT:
        raise CheckpointError(f"not a vitserve checkpoint (no format marker); keys: {few(list(state))}")
    version, kind = state.get("version"), state.get("kind")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version!r}; this vitserve reads versions up to {FORMAT_VERSION}")
    weights = state.get("state_dict")
    if kind not in ("vit", "mae") or not isinstance(state.get("config"), Mapping) or not isinstance(weights, Mapping) \
            or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise CheckpointError("damaged vitserve checkpoint: kind, config or state_dict is missing or malformed")
    try:
        config = ViTConfig.from_dict(state["config"]) if kind == "vit" else MAEConfig.from_dict(state["config"])
        config = _apply_overrides(config, overrides)
    except (TypeError, ValueError) as exc:  # ConfigError included
        raise CheckpointError(f"invalid {kind} config: {exc}") from exc
    if preset is not None:
        encoder = config.encoder if isinstance(config, MAEConfig) else config
        facts = {name: getattr(encoder, name) for name in PRESET_CHECKED}
        if isinstance(config, MAEConfig):
            facts.update(decoder_embed_dim=config.decoder_embed_dim, decoder_depth=config.decoder_depth)
        preset_config(preset, kind, facts)
    model = _build(kind, config, dict(weights))
    return LoadedCheckpoint(
        model=model, kind=kind,
        labels=_labels(overrides.get("labels", state.get("labels")), _num_classes(model)),
        mean=_triple(overrides.get("mean", state.get("mean", IMAGENET_MEAN)), "mean"),
        std=_triple(overrides.get("std", state.get("std", IMAGENET_STD)), "std"),
        step=int(state.get("step", 0)), source="vitserve", training=state.get("training"),
    )


def _apply_overrides(config: ViTConfig | MAEConfig, overrides: dict[str, Any]) -> ViTConfig | MAEConfig:
    vit_changes = {k: v for k, v in overrides.items() if k in VIT_FIELDS}
    if isinstance(config, ViTConfig):
        return config.replace(**vit_changes)
    mae_changes = {k: v for k, v in overrides.items() if k in MAE_FIELDS}
    return config.replace(encoder=config.encoder.replace(**vit_changes), **mae_changes)


# --- loading ---------------------------------------------------------------------------

def load_checkpoint(path: str | os.PathLike, *, source: str = "auto", preset: str | None = None, **overrides: Any) -> LoadedCheckpoint:
    """Load our checkpoint, or import a timm / official MAE / Hugging Face one, into an eval-mode model.

    `path`: a .pt/.pth/.bin file, a .safetensors file, or a Hugging Face model directory.
    `overrides`: ViTConfig / MAEConfig fields (num_heads, image_size, pooling, norm_eps, decoder_num_heads,
    norm_pix_loss, ...) and labels, mean, std; None means "not given". MAE-only fields are ignored for a ViT.
    """
    try:
        return _load(Path(path), source, preset, {k: v for k, v in overrides.items() if v is not None})
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def import_checkpoint(path: str | os.PathLike, *, source: str = "auto", preset: str | None = None, **overrides: Any) -> nn.Module:
    """Just the model of `load_checkpoint`."""
    return load_checkpoint(path, source=source, preset=preset, **overrides).model


def _load(path: Path, source: str, preset: str | None, overrides: dict[str, Any]) -> LoadedCheckpoint:
    unknown = set(overrides) - VIT_FIELDS - MAE_FIELDS - _META_FIELDS
    if unknown:
        known = sorted(VIT_FIELDS | MAE_FIELDS | _META_FIELDS)
        raise CheckpointError(f"unknown override(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    if source not in ("auto", *SOURCES):
        raise CheckpointError(f"unknown source {source!r}; choose one of auto, {', '.join(SOURCES)}")
    files = _read(path)
    found = detect_source(files.state) if source == "auto" else source
    if found == "vitserve":
        return _load_own(files.state, preset, overrides)

    config_overrides = {k: v for k, v in overrides.items() if k not in _META_FIELDS}
    told = {**files.settings, **config_overrides}
    image_size = parse_size(told["image_size"]) if "image_size" in told else None
    converted = convert(files.state, found, image_size)
    check_agrees(files.settings, converted.facts, "config.json")
    check_agrees(config_overrides, converted.facts, "override")
    model = _build(converted.kind, resolve_config(converted, preset, told), converted.state_dict)
    num_classes = _num_classes(model)
    labels = overrides.get("labels")
    if labels is None and files.labels is not None and num_classes == len(files.labels):
        labels = files.labels  # config.json id2label, when it describes this head
    return LoadedCheckpoint(
        model=model, kind=converted.kind, labels=_labels(labels, num_classes),
        mean=_triple(overrides.get("mean", files.mean if files.mean is not None else IMAGENET_MEAN), "mean"),
        std=_triple(overrides.get("std", files.std if files.std is not None else IMAGENET_STD), "std"),
        step=0, source=found, training=None,
    )


# --- reading files ------------------------------------------------------------------------

@dataclass
class _Files:
    state: Any  # what the weights file holds
    settings: dict[str, Any]  # config.json, in our config's names
    labels: list[str] | None = None
    mean: Any = None
    std: Any = None


def _read(path: Path) -> _Files:
    if path.is_dir():
        return _read_hf_directory(path)
    if not path.exists():
        raise CheckpointError("no such file or directory")
    return _Files(_read_weights(path), {})


def _read_weights(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise CheckpointError("reading .safetensors files needs the safetensors package") from exc
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path.name} is not a readable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{path.name} holds a Python object ({refused.group(1)}) that safe loading (weights_only=True) refuses; "
                "re-save just the weights, e.g. torch.save({'model': checkpoint['model']}, path)"
            ) from exc
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint (corrupt or another kind of file)") from exc


def _read_hf_directory(path: Path) -> _Files:
    """A Hugging Face model directory: config.json, the weights, maybe preprocessor_config.json."""
    if not (path / "config.json").is_file():
        raise CheckpointError("a model directory needs a Hugging Face config.json")
    settings, labels = hf_config_settings(_read_json(path / "config.json"))
    files = _Files(_read_hf_weights(path), settings, labels)
    if (path / "preprocessor_config.json").is_file():
        preprocessor = _read_json(path / "preprocessor_config.json")
        files.mean, files.std = preprocessor.get("image_mean"), preprocessor.get("image_std")
    return files


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return _read_weights(path / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():  # sharded: the index maps every weight to its shard
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(_read_json(path / name).get("weight_map", {}).values())):
                state.update(_read_weights(path / shard))
            return state
    raise CheckpointError("the directory has no model.safetensors or pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    return data


# --- building --------------------------------------------------------------------------------

def _build(kind: str, config: ViTConfig | MAEConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model, with every weight checked by name and shape before loading."""
    try:
        model = VisionTransformer(config) if kind == "vit" else MaskedAutoencoder(config)
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot build the {kind} model: {exc}") from exc
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong = [
        f"{key} {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    problems = [
        f"{label}: {few(keys)}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
        if keys
    ]
    if problems:
        raise CheckpointError(f"the weights do not fit the {kind} model ({'; '.join(problems)})")
    model.load_state_dict(state_dict)
    return model.eval()


def _num_classes(model: nn.Module) -> int:
    return model.config.num_classes if isinstance(model, VisionTransformer) else 0


def _labels(labels: Any, num_classes: int) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or not all(isinstance(label, str) for label in labels):
        raise CheckpointError("labels must be a list of strings")
    labels = list(labels)
    if num_classes and len(labels) != num_classes:
        raise CheckpointError(f"{len(labels)} labels for a head with {num_classes} classes")
    return labels


def _triple(values: Any, name: str) -> tuple[float, float, float]:
    """Per-channel normalisation as three floats (one number means the same for all channels)."""
    if isinstance(values, (int, float)):
        values = (values,) * 3
    try:
        triple = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name} must be three numbers, got {values!r}") from exc
    if len(triple) != 3 or (name == "std" and min(triple) <= 0):
        raise CheckpointError(f"{name} must be three numbers{' above 0' if name == 'std' else ''}, got {values!r}")
    return triple
