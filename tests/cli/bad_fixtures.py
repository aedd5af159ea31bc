"""File fixtures for the bad-input table (tests/cli/bad_inputs.py): each function returns a
``setup(folder)`` that writes one kind of (bad) input. Expensive ones (a checkpoint, an exported
program) are built once per process and copied."""

from __future__ import annotations

import functools
import gzip
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent

PYFILE = '''import torch.nn as nn

NUMBER = 5


class Net(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3)
        self.fc = nn.Linear(width * 26 * 26, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def not_a_model():
    return {"not": "a model"}


def make(width: int = 4):
    return Net(width)
'''


def _target(folder: Path, name: str) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def both(*setups):
    def setup(folder: Path) -> None:
        for s in setups:
            s(folder)
    return setup


def folder(name: str):
    return lambda d: _target(d, name).mkdir(parents=True, exist_ok=True)


def fifo(name: str):
    return lambda d: os.mkfifo(_target(d, name))


def garbage(name: str, data: bytes = b"this is not what the name says\n" * 4):
    return lambda d: _target(d, name).write_bytes(data)


def pyfile(name: str, text: str = PYFILE):
    return lambda d: _target(d, name).write_text(text)


def user_folder(name: str):
    """A folder of the user's own files (one of them named like ours)."""
    def setup(d: Path) -> None:
        f = d if name == "." else _target(d, name)
        f.mkdir(parents=True, exist_ok=True)
        (f / "notes.txt").write_text("my notes\n")
        (f / "config.json").write_text('{"mine": true}\n')
    return setup


def readonly(name: str):
    """A folder nobody can create files in: mode 0555, or (as root, whom modes do not stop) a link to a
    /proc folder, where even root cannot create files."""
    def setup(d: Path) -> None:
        p = _target(d, name)
        if os.geteuid() == 0:
            p.symlink_to("/proc/1/fdinfo")
        else:
            p.mkdir()
            p.chmod(0o555)
    return setup


def restore_modes(root: Path) -> None:
    """Give every folder under ``root`` its write bit back (so it can be deleted)."""
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and not p.is_symlink() and not os.access(p, os.W_OK):
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


@functools.lru_cache(maxsize=None)
def _checkpoint_bytes(dataset: str | None) -> tuple[bytes, bytes]:
    import tempfile

    import torch

    from efficientml.models import build_model
    from efficientml.train import save_checkpoint

    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1}
    meta = {"model": "small_cnn", "model_kwargs": kwargs, "dataset": dataset or "fashion-mnist",
            "train_config": {"lr": 0.1}, "step": 0, "history": []}
    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "c.safetensors"
        save_checkpoint(p, build_model("small_cnn", **kwargs), meta)
        return p.read_bytes(), p.with_suffix(".safetensors.json").read_bytes()


def checkpoint(name: str, optim: str | None = None, dataset: str | None = None):
    """A small_cnn checkpoint (untrained) as `efficientml train` writes it; ``optim="bad"`` adds an
    optimizer file whose metadata is not JSON."""
    def setup(d: Path) -> None:
        w, j = _checkpoint_bytes(dataset)
        p = _target(d, name)
        p.write_bytes(w)
        p.with_name(p.name + ".json").write_bytes(j)
        if optim == "bad":
            import torch

            from efficientml.core.serialization import save_state_dict
            from efficientml.train.checkpoint import optim_path

            save_state_dict(optim_path(p), {"state.0.momentum_buffer": torch.zeros(3)},
                            metadata={"param_groups": "not json", "scalars": "{}"})
    return setup


def plain_state(name: str):
    def setup(d: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"weight": torch.ones(3, 3)}, str(_target(d, name)))
    return setup


def meta_text(name: str, text: str):
    """A safetensors file whose efficientml metadata is ``text`` verbatim."""
    def setup(d: Path) -> None:
        import torch
        from safetensors.torch import save_file

        save_file({"weight": torch.ones(2)}, str(_target(d, name)), metadata={"efficientml": text})
    return setup


def torch_obj(name: str, obj):
    def setup(d: Path) -> None:
        import torch

        torch.save(obj, _target(d, name))
    return setup


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def evil_pickle(name: str):
    """A pickle that would run a shell command when unpickled without weights_only."""
    return torch_obj(name, {"weight": _Evil()})


@functools.lru_cache(maxsize=None)
def _exported_bytes() -> bytes:
    import io

    import torch
    import torch.nn as nn

    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    buf = io.BytesIO()
    torch.export.save(torch.export.export(m, (torch.randn(1, 1, 28, 28),)), buf)
    return buf.getvalue()


def exported(name: str):
    return lambda d: _target(d, name).write_bytes(_exported_bytes())


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.astype(np.uint8).tobytes())


def fashion_mnist(name: str, bad_label: int | None = None, n_labels: int | None = None, garbage: bool = False):
    """Four Fashion-MNIST files of 4 images each, with one label out of range, a label count that does
    not match, or a test image file that is not IDX."""
    def setup(d: Path) -> None:
        f = _target(d, name)
        f.mkdir()
        for split in ("train", "t10k"):
            labels = np.array([1, bad_label if bad_label is not None else 2, 3, 4][: n_labels or 4])
            (f / f"{split}-images-idx3-ubyte.gz").write_bytes(
                b"garbage" if garbage and split == "t10k" else _idx(np.zeros((4, 28, 28))))
            (f / f"{split}-labels-idx1-ubyte.gz").write_bytes(_idx(labels))
    return setup


BASE_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1,
               "eos_token_id": 2, "tie_word_embeddings": True}


def hf_config(name: str, text: str | None = None, **overrides):
    """A Hugging Face folder holding only config.json: ``text`` verbatim, or a tiny Llama config with
    ``overrides``."""
    def setup(d: Path) -> None:
        f = _target(d, name)
        f.mkdir()
        (f / "config.json").write_text(text if text is not None else json.dumps({**BASE_CONFIG, **overrides}))
    return setup


def gguf(name: str, alignment: int | None = None, head_count: int = 4, eps: float = 1e-5,
         rope_base: float = 10000.0, bos: int = 1, eos: int = 2):
    """A GGUF file (written by the gguf package) with a tiny Llama's metadata and 32 tokens, no tensors."""
    def setup(d: Path) -> None:
        import gguf as g

        w = g.GGUFWriter(str(_target(d, name)), "llama")
        if alignment is not None:
            w.add_uint32("general.alignment", alignment)
        w.add_context_length(64)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_block_count(2)
        w.add_head_count(head_count)
        w.add_head_count_kv(2 if head_count else 0)
        w.add_layer_norm_rms_eps(eps)
        w.add_rope_freq_base(rope_base)
        w.add_tokenizer_model("llama")
        w.add_token_list([f"t{i}" for i in range(32)])
        w.add_token_scores([0.0] * 32)
        w.add_token_types([1] * 32)
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return setup

