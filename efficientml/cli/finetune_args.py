"""The ``finetune`` subcommand's method names and per-method options (kept apart from its main flow)."""

from __future__ import annotations

import argparse

from efficientml.cli.common import number, positive_int

LLM_METHODS = ["lora", "qlora", "w4lora", "dora", "full", "bitfit", "adapter", "prompt", "prefix", "ia3"]
CNN_ONLY = ["tinytl", "last-layer"]
CNN_METHODS = ["tinytl", "bitfit", "last-layer", "full"]


def add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method options")
    g.add_argument("--add-bias", action="store_true",
                   help="bitfit on a bias-free model (LLaMA family): give the target linears zero biases to train")
    g.add_argument("--adapter-style", default="houlsby", choices=["houlsby", "pfeiffer"],
                   help="adapter placement: after attention and MLP (houlsby) or after the MLP (pfeiffer)")
    g.add_argument("--reduction-factor", type=positive_int, default=16, help="adapter bottleneck = width / this")
    g.add_argument("--virtual-tokens", type=positive_int, default=20, help="prompt/prefix length")
    g.add_argument("--prefix-projection", action="store_true", help="prefix tuning through the reparametrisation MLP")
    c = p.add_argument_group("CNN options (a zoo model such as resnet20)")
    c.add_argument("--epochs", type=number("a positive number of epochs", 0, low_open=True), default=1.0)
    c.add_argument("--train-subset", type=positive_int, default=None, help="train on this many images")
    c.add_argument("--test-subset", type=positive_int, default=None, help="evaluate on this many images")
    c.add_argument("--no-pretrained", action="store_true", help="start from random weights, not the pretrained ones")


def split_targets(spec: str | None) -> tuple[str, ...] | None:
    if spec is None:
        return None
    return tuple(t.strip() for t in spec.split(",") if t.strip()) or None


def is_cnn(model: str) -> bool:
    import efficientml.models  # noqa: F401  (registers the zoo)
    from efficientml.models.registry import list_models

    return model in list_models()


def peft_config(args: argparse.Namespace, targets: tuple[str, ...] | None):
    """The config of a non-LoRA LLM method (None for lora/qlora/dora/full)."""
    from efficientml.finetune.methods import PEFT_METHODS, method_config

    if args.method not in PEFT_METHODS:
        return None
    return method_config(args.method, targets, args.add_bias, args.adapter_style, args.reduction_factor,
                         args.virtual_tokens, args.prefix_projection, args.seed)
