"""A stand-in for the few torchvision names `import timm` touches, so timm's ViT runs where torchvision cannot.

torchvision from PyPI does not import beside this machine's local torch build, and timm imports
it at module level only for names its ViT never uses: a frozen batch norm (ResNet fine-tuning
helpers), the data pipeline's transforms and datasets. Building and running a `VisionTransformer`
touches none of them, so each name here is a placeholder that refuses to be used.

For tests only: `standin_modules()` builds the modules and a fixture puts them in `sys.modules`
for as long as it needs timm; nothing here is part of the vitserve package.
"""
from __future__ import annotations

import enum
import types


class InterpolationMode(enum.Enum):
    """timm maps these to its own interpolation names when `timm.data` is imported."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(module: str, name: str) -> type:
    """A class timm may subclass or name in isinstance checks, but that cannot be built."""

    def refuse(self, *args, **kwargs):
        raise RuntimeError(f"{module}.{name} is a test stand-in (tests/torchvision_standin.py); torchvision is not installed")

    return type(name, (), {"__init__": refuse, "__module__": module})


# module -> the names timm imports from it at import time (timm 1.0.x; optional ones it guards are left out).
_NAMES = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "torchvision.transforms": ("ToTensor",),
    "torchvision.datasets": ("CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"),
}


def standin_modules() -> dict[str, types.ModuleType]:
    """`torchvision` and the submodules timm imports, by their dotted names, ready for `sys.modules`."""
    modules = {name: types.ModuleType(name, "test stand-in for torchvision") for name in (
        "torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
        "torchvision.transforms.functional", "torchvision.datasets")}
    for module, names in _NAMES.items():
        for name in names:
            setattr(modules[module], name, _unavailable(module, name))
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode
    modules["torchvision.transforms"].InterpolationMode = InterpolationMode
    for dotted, module in modules.items():  # `import a.b as c` reads b off a
        if "." in dotted:
            parent, child = dotted.rsplit(".", 1)
            setattr(modules[parent], child, module)
    return modules
