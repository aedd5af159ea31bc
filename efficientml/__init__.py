"""efficientml: make neural networks smaller and faster, and prove it with measurements.

    import efficientml
    from efficientml.quant import IntegerConfig
    int8 = efficientml.apply(model, IntegerConfig(), calib=loader).model

Importing the package is light: it does not initialize CUDA and does not import matplotlib,
Triton, transformers or any other optional dependency. Subpackages are imported on use, and so is
``apply`` (the transform registry, efficientml.core.transform), through the module ``__getattr__``.
"""

from typing import Any

from efficientml.core.errors import EfficientMLError

__version__ = "0.1.0"
__all__ = ["EfficientMLError", "LayerFilter", "TransformResult", "__version__", "apply"]

_LAZY = {"apply", "LayerFilter", "TransformResult", "register_transform"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from efficientml.core import transform

        return getattr(transform, name)
    raise AttributeError(f"module 'efficientml' has no attribute {name!r}")
