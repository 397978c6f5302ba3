"""Every failure vit-export knows, as one hierarchy: the CLI catches `ExportError` (and the checkpoint and
repository errors of the layers below) and prints `vit-export: error: ...` with exit status 2."""
from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be done as asked (the message says why)."""


class ParityError(ExportError):
    """The ONNX graph does not compute what the PyTorch model computes."""


class VariantError(ExportError):
    """An int8 / fp16 variant that disagrees with the fp32 graph beyond its tolerance, or cannot be built."""
