"""The model zoo, built by name: ``build_model("resnet20", pretrained=True)``."""

import importlib

from efficientml.models.registry import MODELS, build_model, list_models

for _mod in ("vgg", "resnet_cifar", "mobilenetv2", "resnet_imagenet", "small_cnn", "mobilenetv3",
             "efficientnet", "regnet", "shufflenetv2", "mbnet"):
    try:
        importlib.import_module(f"efficientml.models.{_mod}")
    except ModuleNotFoundError as _e:  # a zoo file not written yet
        if _e.name != f"efficientml.models.{_mod}":
            raise

__all__ = ["MODELS", "build_model", "list_models"]
