"""efficientml: make neural networks smaller and faster, and prove it with measurements.

Importing the package is light: it does not initialize CUDA and does not import matplotlib,
Triton, transformers or any other optional dependency. Subpackages are imported on use.
"""

from efficientml.core.errors import EfficientMLError

__version__ = "0.1.0"
__all__ = ["EfficientMLError", "__version__"]
