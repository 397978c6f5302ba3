"""Foreign ViT / MAE weights -> our key layout and config: timm, the official MAE release, Hugging Face.

Every converter returns a `Converted`: the state dict in the key layout of `model/vit.py`
(or `model/mae.py`) plus the configuration the weights reveal by their shapes (width, depth,
patch size, ...). `resolve_config` settles the rest.

- `sources`: recognising a checkpoint's format, and the converter for each
- `timm_layout`: timm `VisionTransformer` (and the official MAE encoder) weights
- `mae_layout`: the official MAE decoder
- `huggingface`: Hugging Face names and config.json, renamed onto the timm layout
- `resolve`: the config of foreign weights (facts, then told, then preset, then defaults)
- `common`: the error type, `Converted`, and helpers for reading a state dict
"""
from .common import (
    CheckpointError,
    Converted,
    count_blocks,
    few,
    mlp_ratio,
    parse_size,
    require,
    unwrap_state_dict,
)
from .huggingface import hf_config_settings, rename_hf
from .mae_layout import DECODER_PREFIXES, convert_decoder
from .resolve import (
    DEFAULT_DECODER_HEADS,
    DEFAULT_EPS,
    MAE_FIELDS,
    PRESET_CHECKED,
    STANDARD_HEADS,
    VIT_FIELDS,
    check_agrees,
    preset_config,
    resolve_config,
)
from .sources import FORMAT, SOURCES, convert, detect_source
from .timm_layout import UNSUPPORTED, convert_timm_layout

__all__ = [
    "DECODER_PREFIXES",
    "DEFAULT_DECODER_HEADS",
    "DEFAULT_EPS",
    "FORMAT",
    "MAE_FIELDS",
    "PRESET_CHECKED",
    "SOURCES",
    "STANDARD_HEADS",
    "UNSUPPORTED",
    "VIT_FIELDS",
    "CheckpointError",
    "Converted",
    "check_agrees",
    "convert",
    "convert_decoder",
    "convert_timm_layout",
    "count_blocks",
    "detect_source",
    "few",
    "hf_config_settings",
    "mlp_ratio",
    "parse_size",
    "preset_config",
    "rename_hf",
    "require",
    "resolve_config",
    "unwrap_state_dict",
]
