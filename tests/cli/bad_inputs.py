"""A table of bad command lines and inputs, each expected to end with exit code 2 and one line on
stderr naming what was wrong, with nothing written and nothing lost.

    from tests.cli.bad_inputs import CASES, run_case, summary
    summary()  # {"bad_input_cases": N, "bad_input_tracebacks": n, "bad_input_files_lost": n, ...}

Each :class:`Case` runs in its own folder (the current directory during the run, so default output
paths land there too), in-process through ``efficientml.cli.main.main``. ``setup`` writes the files the
case needs (see :mod:`tests.cli.bad_fixtures`); ``{tmp}`` in argv is that folder. Runnable outside
pytest (``python -m tests.cli.bad_inputs`` prints the summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_ROOT = Path(__file__).resolve().parents[2]
if (_ROOT / "efficientml").is_dir() and "efficientml" not in sys.modules:
    sys.path.insert(0, str(_ROOT))  # test the package of the tree this file lives in
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its fixtures, however this file was imported
import bad_fixtures as fx  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    match: str                                   # regex the single error line must match (re.search)
    setup: Callable[[Path], None] | None = None  # writes the files the case needs into its folder
    stdin: bytes | str | None = None             # bytes: piped in; "closed": no stdin at all
    code: int = 2


def _c(name, argv, match, setup=None, stdin=None):
    return Case(name, tuple(argv.split()) if isinstance(argv, str) else tuple(argv), match, setup, stdin)


LLM = "smollm2-135m"
S = "{tmp}/"

CASES: list[Case] = [
    # --- the command itself -------------------------------------------------------------------
    _c("no-such-command", "nosuch", r"invalid choice: 'nosuch'"),
    _c("unknown-global-flag", "--nope profile resnet20", r"unrecognized arguments: --nope"),
    _c("llm-without-action", "llm", r"choose an action: info, ppl"),
    _c("llm-unknown-action", "llm nosuch", r"invalid choice: 'nosuch'"),
    _c("unknown-flag-in-subcommand", "profile resnet20 --nope", r"unrecognized arguments: --nope"),
    # --- profile --------------------------------------------------------------------------------
    _c("profile-unknown-model", "profile resnet21", r"unknown model 'resnet21' \(did you mean"),
    _c("profile-nothing", "profile", r"give a model .* or --checkpoint"),
    _c("profile-shape-letters", "profile resnet20 --input-shape a,b", r"--input-shape must be positive integers"),
    _c("profile-shape-zero", "profile resnet20 --input-shape 0,3,32,32", r"--input-shape must be positive"),
    _c("profile-shape-negative", ["profile", "resnet20", "--input-shape=-1,3,32,32"], r"--input-shape must be positive"),
    _c("profile-shape-empty", ["profile", "resnet20", "--input-shape", ","], r"--input-shape must be positive"),
    _c("profile-shape-huge", "profile resnet20 --input-shape 1,3,22400,22400", r"needs 6\.0 GB .* limit"),
    _c("profile-shape-huge-batch", "profile small_cnn --input-shape 100000,1,28,28000", r"needs .* GB"),
    _c("profile-shape-channels", "profile resnet20 --input-shape 1,1,32,32", r"1.1.32.32|channel"),
    _c("profile-shape-3d", "profile resnet20 --input-shape 3,32,32", r"--input-shape 3,32,32 has 3 dimensions; .* Conv2d, which takes 4 \(N,C,H,W, e.g. 1,3,32,32\)"),
    _c("profile-shape-2d", "profile resnet20 --input-shape 1,3", r"--input-shape 1,3 has 2 dimensions; .* takes 4 \(N,C,H,W"),
    _c("profile-shape-5d", "profile resnet20 --input-shape 1,1,3,32,32", r"has 5 dimensions"),
    _c("profile-runs-zero", "profile resnet20 --runs 0", r"expected a positive integer, got '0'"),
    _c("profile-runs-text", "profile resnet20 --runs many", r"expected a positive integer, got 'many'"),
    _c("profile-warmup-negative", ["profile", "resnet20", "--warmup=-1"], r"expected a non-negative integer"),
    _c("profile-warmup-nan", "profile resnet20 --warmup nan", r"expected a non-negative integer, got 'nan'"),
    _c("profile-threads-zero", "profile resnet20 --threads 0", r"expected a positive integer"),
    _c("profile-sparse-format", "profile resnet20 --sparse-format coo", r"invalid choice: 'coo'"),
    _c("profile-model-arg-no-eq", "profile vgg --model-arg width", r"--model-arg expects KEY=VALUE"),
    _c("profile-model-arg-no-key", "profile vgg --model-arg =3", r"--model-arg expects KEY=VALUE"),
    _c("profile-model-arg-unknown", "profile resnet20 --model-arg colour=3", r"does not accept these arguments"),
    _c("profile-ckpt-missing", f"profile --checkpoint {S}nope.safetensors", r"nope.safetensors' does not exist"),
    _c("profile-ckpt-dir", f"profile --checkpoint {S}adir", r"is a folder; expected a file", fx.folder("adir")),
    _c("profile-ckpt-fifo", f"profile --checkpoint {S}fifo", r"is a FIFO; expected a file", fx.fifo("fifo")),
    _c("profile-ckpt-garbage", f"profile --checkpoint {S}g.safetensors", r"not a readable safetensors",
       fx.garbage("g.safetensors")),
    _c("profile-ckpt-empty", f"profile --checkpoint {S}e.safetensors", r"not a readable safetensors",
       fx.garbage("e.safetensors", b"")),
    _c("profile-ckpt-plain-no-model", f"profile --checkpoint {S}sd.safetensors", r"plain state dict .* give the model",
       fx.plain_state("sd.safetensors")),
    _c("profile-ckpt-meta-bad-json", f"profile --checkpoint {S}m.safetensors", r"malformed efficientml metadata",
       fx.meta_text("m.safetensors", "{not json")),
    _c("profile-ckpt-meta-list", f"profile --checkpoint {S}m.safetensors", r"metadata of type list",
       fx.meta_text("m.safetensors", "[1, 2]")),
    _c("profile-ckpt-meta-kwargs-str", f"profile --checkpoint {S}m.safetensors", r"'model_kwargs' is a str",
       fx.meta_text("m.safetensors", '{"model": "small_cnn", "model_kwargs": "wide"}')),
    _c("profile-ckpt-meta-model-int", f"profile --checkpoint {S}m.safetensors", r"'model' is a int",
       fx.meta_text("m.safetensors", '{"model": 5}')),
    _c("profile-ckpt-meta-unknown-model", f"profile --checkpoint {S}m.safetensors", r"unknown model 'resnet999'",
       fx.meta_text("m.safetensors", '{"model": "resnet999"}')),
    _c("profile-ckpt-meta-bad-kwarg", f"profile --checkpoint {S}m.safetensors", r"does not accept these arguments",
       fx.meta_text("m.safetensors", '{"model": "small_cnn", "model_kwargs": {"colour": 1}}')),
    _c("profile-ckpt-meta-no-model", f"profile --checkpoint {S}m.safetensors", r"does not name its model",
       fx.meta_text("m.safetensors", '{"dataset": "fashion-mnist"}')),
    _c("profile-ckpt-wrong-model", f"profile vgg --checkpoint {S}c.safetensors", r"holds a 'small_cnn' model, not 'vgg'",
       fx.checkpoint("c.safetensors")),
    _c("profile-ckpt-plain-wrong-shapes", f"profile resnet20 --checkpoint {S}sd.safetensors", r"does not fit the model",
       fx.plain_state("sd.safetensors")),
    _c("profile-ckpt-pt-garbage", f"profile small_cnn --checkpoint {S}sd.pt", r"not a PyTorch state dict",
       fx.garbage("sd.pt")),
    _c("profile-ckpt-pt-not-dict", f"profile small_cnn --checkpoint {S}sd.pt", r"not a state dict of named tensors",
       fx.torch_obj("sd.pt", [1, 2, 3])),
    _c("profile-ckpt-pt-pickle-code", f"profile small_cnn --checkpoint {S}evil.pt", r"not a PyTorch state dict",
       fx.evil_pickle("evil.pt")),
    _c("profile-pt2-missing", f"profile {S}nope.pt2", r"nope.pt2' does not exist"),
    _c("profile-pt2-garbage", f"profile {S}g.pt2", r"not a torch.export program", fx.garbage("g.pt2")),
    _c("profile-pt2-model-arg", f"profile {S}m.pt2 --model-arg width=2", r"--model-arg does not apply to a .pt2",
       fx.exported("m.pt2")),
    _c("profile-py-missing", f"profile {S}nope.py:Net", r"model file .*nope.py' does not exist"),
    _c("profile-py-no-name", f"profile {S}m.py:Missing", r"defines no 'Missing'; its nn.Module classes: Net",
       fx.pyfile("m.py")),
    _c("profile-py-not-callable", f"profile {S}m.py:NUMBER", r"is a int; expected a nn.Module class", fx.pyfile("m.py")),
    _c("profile-py-factory-not-module", f"profile {S}m.py:not_a_model", r"returned a dict; expected a torch.nn.Module",
       fx.pyfile("m.py")),
    _c("profile-py-syntax", f"profile {S}bad.py:Net", r"syntax error on line 2", fx.pyfile("bad.py", "x = 1\ndef (:\n")),
    _c("profile-py-bad-arg", f"profile {S}m.py:Net --model-arg depth=3", r"does not accept --model-arg \['depth'\]",
       fx.pyfile("m.py")),
    _c("profile-py-bad-name", f"profile {S}m.py:1x", r"expected path/to/file.py:Name", fx.pyfile("m.py")),
    _c("profile-py-dir", f"profile {S}pkg.py:Net", r"is a folder; expected a file", fx.folder("pkg.py")),
    # --- train ----------------------------------------------------------------------------------
    _c("train-unknown-model", "train resnet21 --epochs 1", r"unknown model 'resnet21'"),
    _c("train-epochs-zero", "train small_cnn --epochs 0", r"expected a positive number of epochs, got '0'"),
    _c("train-epochs-negative", ["train", "small_cnn", "--epochs=-1"], r"expected a positive number of epochs"),
    _c("train-epochs-nan", "train small_cnn --epochs nan", r"expected a positive number of epochs, got 'nan'"),
    _c("train-epochs-inf", "train small_cnn --epochs inf", r"expected a positive number of epochs, got 'inf'"),
    _c("train-epochs-text", "train small_cnn --epochs ten", r"got 'ten'"),
    _c("train-lr-zero", "train small_cnn --lr 0", r"expected a learning rate in \(0, 100\]"),
    _c("train-lr-nan", "train small_cnn --lr nan", r"expected a learning rate"),
    _c("train-lr-huge", "train small_cnn --lr 1e9", r"expected a learning rate"),
    _c("train-batch-zero", "train small_cnn --batch-size 0", r"expected a positive integer, got '0'"),
    _c("train-batch-negative", ["train", "small_cnn", "--batch-size=-3"], r"expected a positive integer, got '-3'"),
    _c("train-batch-float", "train small_cnn --batch-size 1.5", r"expected a positive integer, got '1.5'"),
    _c("train-optimizer", "train small_cnn --optimizer lion", r"--optimizer must be one of \['adamw', 'sgd'\]"),
    _c("train-schedule", "train small_cnn --schedule wavy", r"--schedule must be one of"),
    _c("train-weight-decay-nan", "train small_cnn --weight-decay nan", r"expected a weight decay"),
    _c("train-weight-decay-big", "train small_cnn --weight-decay 2", r"expected a weight decay in \[0, 1\]"),
    _c("train-label-smoothing-one", "train small_cnn --label-smoothing 1", r"expected a label smoothing"),
    _c("train-dataset", "train small_cnn --dataset imagenet", r"unknown dataset 'imagenet'"),
    _c("train-model-arg", "train vgg --model-arg width", r"--model-arg expects KEY=VALUE, got 'width'"),
    _c("train-model-arg-unknown", "train small_cnn --model-arg colour=1", r"does not accept these arguments"),
    _c("train-threads-zero", "train small_cnn --threads 0", r"expected a positive integer"),
    _c("train-pad-to-zero", "train small_cnn --pad-to 0", r"expected a positive integer"),
    _c("train-subset-zero", "train small_cnn --train-subset 0", r"expected a positive integer"),
    _c("train-out-exists", f"train small_cnn --out {S}c.safetensors", r"--out .* already exists; .* --overwrite",
       fx.checkpoint("c.safetensors")),
    _c("train-out-json-exists", f"train small_cnn --out {S}c.safetensors", r"c.safetensors.json' already exists",
       fx.garbage("c.safetensors.json", b"{}")),
    _c("train-out-optim-exists", f"train small_cnn --out {S}c.safetensors", r"c.optim.safetensors' already exists",
       fx.garbage("c.optim.safetensors")),
    _c("train-out-default-exists", "train small_cnn", r"checkpoints/small_cnn_fmnist.safetensors' already exists",
       fx.checkpoint("checkpoints/small_cnn_fmnist.safetensors")),
    _c("train-out-dir", f"train small_cnn --out {S}d.safetensors", r"is a folder; expected a file",
       fx.folder("d.safetensors")),
    _c("train-out-under-file", f"train small_cnn --out {S}f/c.safetensors", r"lies under .*f', which is a file",
       fx.garbage("f")),
    _c("train-out-long-name", ["train", "small_cnn", "--out", S + "c" * 250 + ".safetensors"],
       r"--out name is 262 bytes long; file names are limited to 255"),
    _c("train-out-suffix", f"train small_cnn --out {S}c.pt", r"must end in .safetensors"),
    _c("train-out-readonly", f"train small_cnn --out {S}ro/c.safetensors", r"--out: cannot write .*ro.* \(permission denied\)",
       fx.readonly("ro")),
    _c("train-resume-missing", f"train small_cnn --resume --out {S}c.safetensors", r"--resume needs an existing"),
    _c("train-resume-bad-optim", f"train small_cnn --epochs 1 --resume --train-subset 64 --out {S}c.safetensors",
       r"optimizer state .* is malformed", fx.checkpoint("c.safetensors", optim="bad")),
    _c("train-resume-no-optim", f"train small_cnn --epochs 1 --resume --train-subset 64 --out {S}c.safetensors",
       r"c.optim.safetensors' does not exist", fx.checkpoint("c.safetensors")),
    _c("train-data-root-missing", f"train small_cnn --data-root {S}nodata", r"data file .* does not exist"),
    _c("train-label-out-of-range", f"train small_cnn --data-root {S}fm", r"has label 12 at index 1; .* 0 to 9",
       fx.fashion_mnist("fm", bad_label=12)),
    _c("train-labels-count", f"train small_cnn --data-root {S}fm", r"labels for 4 images .* one label per image",
       fx.fashion_mnist("fm", n_labels=3)),
    _c("train-idx-garbage", f"train small_cnn --data-root {S}fm", r"not an unsigned-byte IDX file|not a readable IDX",
       fx.fashion_mnist("fm", garbage=True)),
    # --- eval -----------------------------------------------------------------------------------
    _c("eval-missing", f"eval {S}nope.safetensors", r"nope.safetensors' does not exist"),
    _c("eval-dir", f"eval {S}adir", r"is a folder; expected a file", fx.folder("adir")),
    _c("eval-fifo", f"eval {S}fifo", r"is a FIFO", fx.fifo("fifo")),
    _c("eval-garbage", f"eval {S}g.safetensors", r"not a readable safetensors", fx.garbage("g.safetensors")),
    _c("eval-meta-bad-json", f"eval {S}m.safetensors", r"malformed efficientml metadata",
       fx.meta_text("m.safetensors", "{")),
    _c("eval-meta-pruned-str", f"eval {S}m.safetensors", r"'pruned' is a str",
       fx.meta_text("m.safetensors", '{"model": "small_cnn", "pruned": "yes"}')),
    _c("eval-plain-no-model", f"eval {S}sd.safetensors", r"plain state dict", fx.plain_state("sd.safetensors")),
    _c("eval-plain-unknown-model", f"eval {S}sd.safetensors --model nosuchnet", r"unknown model 'nosuchnet'",
       fx.plain_state("sd.safetensors")),
    _c("eval-dataset", f"eval {S}c.safetensors --dataset cifar1000", r"unknown dataset 'cifar1000'",
       fx.checkpoint("c.safetensors")),
    _c("eval-batch-zero", f"eval {S}c.safetensors --batch-size 0", r"expected a positive integer"),
    _c("eval-data-root-names-test-file", f"eval {S}c.safetensors --data-root {S}empty", r"t10k-images",
       fx.both(fx.checkpoint("c.safetensors"), fx.folder("empty"))),
    _c("eval-label-out-of-range", f"eval {S}c.safetensors --data-root {S}fm", r"has label 12",
       fx.both(fx.checkpoint("c.safetensors"), fx.fashion_mnist("fm", bad_label=12))),
    _c("eval-pt2-checkpoint", f"eval {S}sd.safetensors --model {S}m.pt2", r"a .pt2 program cannot be loaded",
       fx.both(fx.plain_state("sd.safetensors"), fx.exported("m.pt2"))),
    # --- distill --------------------------------------------------------------------------------
    _c("distill-no-teacher", "distill --student small_cnn", r"the following arguments are required: --teacher"),
    _c("distill-teacher-missing", f"distill --teacher {S}t.safetensors --student small_cnn", r"t\.safetensors"),
    _c("distill-method", f"distill --teacher {S}t.safetensors --student small_cnn --method fitnet", r"--method must be one of",
       fx.checkpoint("t.safetensors")),
    _c("distill-alpha-range", f"distill --teacher {S}t.safetensors --student small_cnn --alpha 1.5", r"expected a weight in \[0, 1\]"),
    _c("distill-temperature-nan", f"distill --teacher {S}t.safetensors --student small_cnn --temperature nan", r"expected a temperature"),
    _c("distill-layers-unpaired", f"distill --teacher {S}t.safetensors --student small_cnn --method hint --student-layers features.relu0",
       r"pair up one to one", fx.checkpoint("t.safetensors")),
    _c("distill-out-suffix", f"distill --teacher {S}t.safetensors --student small_cnn --out {S}s.pt", r"must end in \.safetensors",
       fx.checkpoint("t.safetensors")),
    _c("distill-out-exists", f"distill --teacher {S}t.safetensors --student small_cnn --out {S}s.safetensors",
       r"already exists; .* --overwrite", fx.both(fx.checkpoint("t.safetensors"), fx.checkpoint("s.safetensors"))),
    _c("distill-student-arg", f"distill --teacher {S}t.safetensors --student small_cnn --student-arg width", r"--student-arg expects KEY=VALUE",
       fx.checkpoint("t.safetensors")),
    # --- prune ----------------------------------------------------------------------------------
    _c("prune-ratio-one", "prune small_cnn --ratio 1", r"expected a number in \[0, 1\), got '1'"),
    _c("prune-ratio-negative", ["prune", "small_cnn", "--ratio=-0.1"], r"expected a number in \[0, 1\)"),
    _c("prune-ratio-nan", "prune small_cnn --ratio nan", r"expected a number in \[0, 1\), got 'nan'"),
    _c("prune-ratio-text", "prune small_cnn --ratio half", r"got 'half'"),
    _c("prune-method", "prune small_cnn --method shave", r"method|shave"),
    _c("prune-criterion", "prune small_cnn --criterion luck", r"criterion|luck"),
    _c("prune-n-zero", "prune small_cnn --method nm --n 0", r"expected a positive integer"),
    _c("prune-finetune-nan", "prune small_cnn --finetune-epochs nan", r"non-negative number of epochs, got 'nan'"),
    _c("prune-finetune-negative", ["prune", "small_cnn", "--finetune-epochs=-1"], r"non-negative number of epochs"),
    _c("prune-lr-nan", "prune small_cnn --lr nan", r"expected a learning rate"),
    _c("prune-batch-zero", "prune small_cnn --batch-size 0", r"expected a positive integer"),
    _c("prune-dataset", "prune small_cnn --dataset mnist9", r"unknown dataset 'mnist9'"),
    _c("prune-unknown-model", "prune resnet21", r"unknown model 'resnet21'"),
    _c("prune-out-exists", f"prune small_cnn --out {S}p.safetensors", r"already exists; .* --overwrite",
       fx.checkpoint("p.safetensors")),
    _c("prune-default-out-exists", "prune small_cnn", r"checkpoints/small_cnn_pruned.safetensors' already exists",
       fx.checkpoint("checkpoints/small_cnn_pruned.safetensors")),
    _c("prune-report-exists", f"prune small_cnn --out {S}p.safetensors --report {S}r.json", r"--report .* already exists",
       fx.garbage("r.json", b"{}")),
    _c("prune-report-is-out", f"prune small_cnn --out {S}p.safetensors --report {S}p.safetensors.json",
       r"--report .* the checkpoint's own path"),
    _c("prune-out-dir", f"prune small_cnn --out {S}d.safetensors", r"is a folder", fx.folder("d.safetensors")),
    _c("prune-out-suffix", f"prune small_cnn --out {S}p.onnx", r"must end in .safetensors"),
    _c("prune-out-under-file", f"prune small_cnn --out {S}f/p.safetensors", r"which is a file", fx.garbage("f")),
    _c("prune-ckpt-missing", f"prune small_cnn --checkpoint {S}nope.safetensors --out {S}p.safetensors",
       r"does not exist"),
    _c("prune-ckpt-wrong-model", f"prune vgg --checkpoint {S}c.safetensors --out {S}p.safetensors",
       r"holds a 'small_cnn' model, not 'vgg'", fx.checkpoint("c.safetensors")),
    _c("prune-pt2", f"prune {S}m.pt2 --out {S}p.safetensors", r"a .pt2 program cannot be pruned", fx.exported("m.pt2")),
    _c("prune-threads-zero", "prune small_cnn --threads 0", r"expected a positive integer"),
    # --- quantize -------------------------------------------------------------------------------
    _c("quantize-missing", f"quantize {S}nope.safetensors", r"does not exist"),
    _c("quantize-dir", f"quantize {S}adir", r"is a folder", fx.folder("adir")),
    _c("quantize-method", f"quantize {S}c.safetensors --method int3", r"invalid choice: 'int3'"),
    _c("quantize-bits-zero", f"quantize {S}c.safetensors --method kmeans --bits 0", r"expected a positive integer"),
    _c("quantize-calib-zero", f"quantize {S}c.safetensors --calibration-batches 0", r"expected a positive integer"),
    _c("quantize-eval-zero", f"quantize {S}c.safetensors --eval-batches 0", r"expected a positive integer"),
    _c("quantize-observer", f"quantize {S}c.safetensors --observer crystal", r"observer|crystal",
       fx.checkpoint("c.safetensors")),
    _c("quantize-format", f"quantize {S}c.safetensors --method weight --format int99", r"format|int99",
       fx.checkpoint("c.safetensors")),
    _c("quantize-out-suffix", f"quantize {S}c.safetensors --out {S}q.bin", r"must end in .onnx .* or .safetensors",
       fx.checkpoint("c.safetensors")),
    _c("quantize-onnx-weight", f"quantize {S}c.safetensors --method weight --out {S}q.onnx", r"ONNX export is for",
       fx.checkpoint("c.safetensors")),
    _c("quantize-int8-safetensors", f"quantize {S}c.safetensors --out {S}q.safetensors", r"written as ONNX",
       fx.checkpoint("c.safetensors")),
    _c("quantize-out-exists", f"quantize {S}c.safetensors --method weight --out {S}q.safetensors",
       r"already exists; .* --overwrite", fx.both(fx.checkpoint("c.safetensors"), fx.checkpoint("q.safetensors"))),
    _c("quantize-onnx-exists", f"quantize {S}c.safetensors --out {S}q.onnx", r"q.onnx' already exists",
       fx.both(fx.checkpoint("c.safetensors"), fx.garbage("q.onnx"))),
    _c("quantize-out-under-file", f"quantize {S}c.safetensors --out {S}f/q.onnx", r"which is a file",
       fx.both(fx.checkpoint("c.safetensors"), fx.garbage("f"))),
    _c("quantize-plain-no-model", f"quantize {S}sd.safetensors", r"plain state dict", fx.plain_state("sd.safetensors")),
    _c("quantize-pt2-model", f"quantize {S}sd.safetensors --model {S}m.pt2", r"a .pt2 program cannot be",
       fx.both(fx.plain_state("sd.safetensors"), fx.exported("m.pt2"))),
    _c("quantize-other-dataset", f"quantize {S}c.safetensors", r"evaluates on Fashion-MNIST; .* 'digits'",
       fx.checkpoint("c.safetensors", dataset="digits")),
    _c("quantize-meta-bad", f"quantize {S}m.safetensors", r"malformed efficientml metadata",
       fx.meta_text("m.safetensors", "nope")),
    # --- engine ---------------------------------------------------------------------------------
    _c("engine-no-action", "engine", r"choose an action: build, run or mcu"),
    _c("engine-unknown-action", "engine nosuch", r"invalid choice: 'nosuch'"),
    _c("engine-build-no-out", "engine build resnet20", r"the following arguments are required: --out"),
    _c("engine-build-unknown-model", f"engine build resnet21 --out {S}o", r"unknown model 'resnet21'"),
    _c("engine-build-ckpt-missing", f"engine build {S}nope.safetensors --out {S}o", r"does not exist"),
    _c("engine-build-sram-zero", f"engine build resnet20 --out {S}o --sram 0", r"--sram: expected a positive number"),
    _c("engine-build-sram-nan", f"engine build resnet20 --out {S}o --sram nan", r"--sram: expected a positive number"),
    _c("engine-build-prefix", f"engine build resnet20 --out {S}o --prefix my-model", r"'my-model' is not a C identifier"),
    _c("engine-build-out-file", f"engine build resnet20 --out {S}f", r"--out .*f' is a file; expected a folder",
       fx.garbage("f")),
    _c("engine-build-exists", f"engine build {S}m.py:Net --input-shape 1,1,28,28 --out {S}o", r"model.c' already exists",
       fx.both(fx.pyfile("m.py"), fx.garbage("o/model.c"))),
    _c("engine-build-sram-small", f"engine build {S}m.py:Net --input-shape 1,1,28,28 --out {S}o --sram 1",
       r"the arena needs [\d,]+ bytes .* more than --sram 1 KB; the smallest budget that fits is [\d.]+ KB",
       fx.pyfile("m.py")),
    _c("engine-build-unsupported", f"engine build small_cnn --skip-unsupported --out {S}o",
       r"no kernel for op 'AdaptiveAvgPool2d' \(layer 'features.avgpool'\)"),
    _c("engine-build-no-integer-kernel", f"engine build small_cnn --out {S}o",
       r"'features.avgpool' \(AdaptiveAvgPool2d\) has no integer implementation; pass --skip-unsupported"),
    _c("engine-build-shape-vs-dataset", f"engine build {S}m.py:Net --dataset fashion-mnist --input-shape 1,1,32,32 "
       f"--out {S}o", r"does not match the fashion-mnist images \(1×28×28\)", fx.pyfile("m.py")),
    _c("engine-build-shape-rank", f"engine build {S}m.py:Net --input-shape 1,784 --out {S}o",
       r"the engine runs image models on N,C,H,W inputs", fx.pyfile("m.py")),
    _c("engine-build-shape-wrong", f"engine build {S}m.py:Net --input-shape 1,1,20,20 --out {S}o",
       r"the model cannot run on input of shape \(1, 1, 20, 20\)", fx.pyfile("m.py")),
    _c("engine-build-model-twice", f"engine build resnet20 --model vgg --out {S}o",
       r"--model names the architecture of a checkpoint"),
    _c("engine-build-dataset", f"engine build resnet20 --dataset nosuch --out {S}o", r"unknown dataset 'nosuch'"),
    _c("engine-build-observer", f"engine build resnet20 --observer nope --out {S}o", r"--observer"),
    _c("engine-run-samples-zero", "engine run resnet20 --samples 0", r"--samples: expected a positive integer"),
    _c("engine-run-threads-zero", "engine run resnet20 --threads 0", r"--threads: expected a positive integer"),
    _c("engine-mcu-sample-negative", "engine mcu resnet20 --sample -1", r"--sample: expected a non-negative integer"),
    # --- formats, demo --------------------------------------------------------------------------
    _c("formats-unknown", "formats int99", r"unknown (number )?format 'int99'"),
    _c("demo-model", "demo --model resnet1000", r"resnet1000"),
    _c("demo-runs-zero", "demo --runs 0", r"expected a positive integer"),
    _c("demo-threads-zero", "demo --threads 0", r"expected a positive integer"),
    # --- search ---------------------------------------------------------------------------------
    _c("search-no-action", "search", r"choose an action: space, costs, build-lut, train, run or extract"),
    _c("search-unknown-action", "search nosuch", r"invalid choice: 'nosuch'"),
    _c("search-costs-bad-json", "search costs {nope", r"is neither largest, smallest, random:SEED"),
    _c("search-costs-random-seed", "search costs random:x", r"random:SEED needs an integer seed"),
    _c("search-costs-outside", f"search costs {S}a.json", r"not in the search space: kernels",
       fx.garbage("a.json", b'{"resolution": 28, "width": 1.0, "depths": [1, 1, 1, 1], '
                  b'"kernels": [4, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3], "expands": [3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3]}')),
    _c("search-costs-not-object", "search costs [1]", r"is not a JSON object naming an architecture"),
    _c("search-space-sram-only", "search space --sram 64", r"need both --sram and --flash"),
    _c("search-space-sram-zero", "search space --sram 0 --flash 1", r"--sram: expected a positive number"),
    _c("search-lut-exists", f"search build-lut --out {S}lut.json", r"lut.json' already exists", fx.garbage("lut.json")),
    _c("search-train-suffix", f"search train --out {S}s.pt", r"must end in .safetensors"),
    _c("search-train-epochs", f"search train --out {S}s.safetensors --epochs 1,2", r"needs four positive numbers"),
    _c("search-train-exists", f"search train --out {S}s.safetensors", r"s.safetensors' already exists",
       fx.garbage("s.safetensors")),
    _c("search-run-missing", f"search run --supernet {S}nope.safetensors --out {S}h.json", r"does not exist"),
    _c("search-run-latency-no-lut", f"search run --supernet {S}nope.safetensors --out {S}h.json --max-latency-ms 2",
       r"--max-latency-ms needs --lut FILE"),
    _c("search-run-out-suffix", f"search run --supernet {S}c.safetensors --out {S}h.txt", r"must end in .json",
       fx.checkpoint("c.safetensors")),
    _c("search-run-not-supernet", f"search run --supernet {S}c.safetensors --out {S}h.json",
       r"is not a supernet checkpoint", fx.checkpoint("c.safetensors")),
    _c("search-run-budget-zero", f"search run --supernet {S}c.safetensors --out {S}h.json --budget 0",
       r"--budget: expected a positive integer", fx.checkpoint("c.safetensors")),
    _c("search-extract-not-supernet", f"search extract --supernet {S}c.safetensors --arch largest --out {S}x.safetensors",
       r"is not a supernet checkpoint", fx.checkpoint("c.safetensors")),
    # --- llm: model sources ---------------------------------------------------------------------
    _c("llm-info-missing", f"llm info {S}nope.gguf", r"nope.gguf"),
    _c("llm-info-empty-folder", f"llm info {S}hf", r"config.json' does not exist", fx.folder("hf")),
    _c("llm-info-config-dir", f"llm info {S}hf", r"config.json' is a folder; expected a file", fx.folder("hf/config.json")),
    _c("llm-info-config-bad-json", f"llm info {S}hf", r"is not valid JSON", fx.hf_config("hf", "{nope")),
    _c("llm-info-config-list", f"llm info {S}hf", r"must hold a JSON object", fx.hf_config("hf", "[1]")),
    _c("llm-info-config-str-int", f"llm info {S}hf", r"hidden_size must be a positive integer, got '64'",
       fx.hf_config("hf", hidden_size="64")),
    _c("llm-info-config-float-layers", f"llm info {S}hf", r"num_hidden_layers must be a positive integer, got 2.5",
       fx.hf_config("hf", num_hidden_layers=2.5)),
    _c("llm-info-config-zero-heads", f"llm info {S}hf", r"num_attention_heads must be a positive integer, got 0",
       fx.hf_config("hf", num_attention_heads=0)),
    _c("llm-info-config-eps-str", f"llm info {S}hf", r"rms_norm_eps must be a finite positive number",
       fx.hf_config("hf", rms_norm_eps="small")),
    _c("llm-info-config-eos-out", f"llm info {S}hf", r"eos_token_id 5000 is not a token id",
       fx.hf_config("hf", eos_token_id=5000)),
    _c("llm-info-config-bool-vocab", f"llm info {S}hf", r"vocab_size must be a positive integer, got True",
       fx.hf_config("hf", vocab_size=True)),
    _c("llm-info-config-model-type", f"llm info {S}hf", r"model_type 'gpt9' .* not supported",
       fx.hf_config("hf", model_type="gpt9")),
    _c("llm-info-gguf-garbage", f"llm info {S}g.gguf", r"g.gguf", fx.garbage("g.gguf", b"GGUF" + b"\0" * 60)),
    _c("llm-info-gguf-alignment-0", f"llm info {S}a.gguf", r"general.alignment is 0; expected a positive integer",
       fx.gguf("a.gguf", alignment=0)),
    _c("llm-info-gguf-head-count-0", f"llm info {S}h.gguf", r"head_count is 0; expected a positive integer",
       fx.gguf("h.gguf", head_count=0)),
    _c("llm-info-gguf-eps-nan", f"llm info {S}e.gguf", r"rms_norm_eps must be a finite positive number, got nan",
       fx.gguf("e.gguf", eps=float("nan"))),
    _c("llm-info-gguf-rope-nan", f"llm info {S}r.gguf", r"rope_theta must be a finite positive number, got nan",
       fx.gguf("r.gguf", rope_base=float("nan"))),
    _c("llm-info-gguf-bos-out", f"llm info {S}b.gguf", r"bos_token_id 999 is not a token id of the vocabulary \(0 to 31\)",
       fx.gguf("b.gguf", bos=999)),
    _c("llm-info-gguf-eos-out", f"llm info {S}b.gguf", r"eos_token_id 32 is not a token id",
       fx.gguf("b.gguf", eos=32)),
    _c("llm-info-dtype", f"llm info {LLM} --dtype fp8", r"invalid choice: 'fp8'"),
    _c("llm-info-device-tpu", f"llm info {LLM} --device tpu9", r"expected cpu, cuda, cuda:N, mps or auto, got 'tpu9'"),
    _c("llm-info-device-cuda-99", f"llm info {LLM} --device cuda:99", r"'cuda:99' is not available"),
    _c("llm-info-threads-zero", f"llm info {LLM} --threads 0", r"expected a positive integer"),
    # --- llm ppl --------------------------------------------------------------------------------
    _c("llm-ppl-text-missing", f"llm ppl {LLM} --text-file {S}nope.txt", r"neither a known corpus .* nor an existing"),
    _c("llm-ppl-text-dir", f"llm ppl {LLM} --text-file {S}adir", r"is a folder; expected a file", fx.folder("adir")),
    _c("llm-ppl-text-latin1", f"llm ppl {LLM} --text-file {S}t.txt", r"is not UTF-8 text \(byte 0xe9 at offset 3\)",
       fx.garbage("t.txt", "caf\u00e9 au lait".encode("latin-1"))),
    _c("llm-ppl-text-bad-utf16", f"llm ppl {LLM} --text-file {S}t.txt", r"starts as UTF-16 but is not valid",
       fx.garbage("t.txt", b"\xff\xfe\x00\xd8")),
    _c("llm-ppl-text-binary", f"llm ppl {LLM} --text-file {S}t.bin", r"is not UTF-8 text",
       fx.garbage("t.bin", bytes(range(128, 256)))),
    _c("llm-ppl-dataset", f"llm ppl {LLM} --dataset wikitext99", r"wikitext99"),
    _c("llm-ppl-both-sources", f"llm ppl {LLM} --dataset tinyshakespeare --text-file x.txt", r"not allowed with"),
    _c("llm-ppl-context-zero", f"llm ppl {LLM} --context 0", r"expected a positive integer"),
    _c("llm-ppl-stride-zero", f"llm ppl {LLM} --stride 0", r"expected a positive integer"),
    _c("llm-ppl-batch-zero", f"llm ppl {LLM} --batch-size 0", r"expected a positive integer"),
    _c("llm-ppl-windows-zero", f"llm ppl {LLM} --max-windows 0", r"expected a positive integer"),
    # --- llm generate / chat --------------------------------------------------------------------
    _c("llm-gen-no-prompt", f"llm generate {LLM}", r"the following arguments are required: prompt"),
    _c("llm-gen-temp-nan", f"llm generate {LLM} hi --temperature nan", r"expected a temperature ≥ 0, got 'nan'"),
    _c("llm-gen-temp-negative", ["llm", "generate", LLM, "hi", "--temperature=-1"], r"expected a temperature ≥ 0"),
    _c("llm-gen-temp-inf", f"llm generate {LLM} hi --temperature inf", r"expected a temperature"),
    _c("llm-gen-top-p-zero", f"llm generate {LLM} hi --top-p 0", r"expected a top-p in \(0, 1\]"),
    _c("llm-gen-top-p-big", f"llm generate {LLM} hi --top-p 1.5", r"expected a top-p"),
    _c("llm-gen-top-p-nan", f"llm generate {LLM} hi --top-p nan", r"expected a top-p"),
    _c("llm-gen-min-p", f"llm generate {LLM} hi --min-p 2", r"expected a min-p in \[0, 1\]"),
    _c("llm-gen-rep-zero", f"llm generate {LLM} hi --repetition-penalty 0", r"expected a repetition penalty > 0"),
    _c("llm-gen-top-k-zero", f"llm generate {LLM} hi --top-k 0", r"expected a positive integer"),
    _c("llm-gen-max-new-zero", f"llm generate {LLM} hi --max-new-tokens 0", r"expected a positive integer"),
    _c("llm-gen-gen-config", f"llm generate {LLM} hi --generation-config maybe", r"invalid choice: 'maybe'"),
    _c("llm-gen-tkw-not-json", ["llm", "generate", LLM, "hi", "--chat", "--chat-template-kwargs", "{oops"],
       r"expected a JSON object"),
    _c("llm-gen-tkw-list", ["llm", "generate", LLM, "hi", "--chat", "--chat-template-kwargs", "[1]"],
       r"expected a JSON object such as"),
    _c("llm-gen-tkw-messages", ["llm", "generate", LLM, "hi", "--chat", "--chat-template-kwargs", '{"messages": 5}'],
       r"'messages' is set by efficientml"),
    _c("llm-gen-tkw-bos", ["llm", "generate", LLM, "hi", "--chat", "--chat-template-kwargs", '{"bos_token": "x"}'],
       r"'bos_token' is set by efficientml"),
    _c("llm-gen-tkw-without-chat", ["llm", "generate", LLM, "hi", "--chat-template-kwargs", '{"a": 1}'],
       r"--chat-template-kwargs applies with --chat"),
    _c("llm-gen-device", f"llm generate {LLM} hi --device quantum", r"expected cpu, cuda"),
    _c("llm-chat-stdin-closed", f"llm chat {LLM}", r"reads its messages from stdin, which is closed", stdin="closed"),
    _c("llm-chat-max-context-zero", f"llm chat {LLM} --max-context 0", r"expected a positive integer"),
    _c("llm-chat-temp-nan", f"llm chat {LLM} --temperature nan", r"expected a temperature"),
    _c("llm-chat-tkw-messages", ["llm", "chat", LLM, "--chat-template-kwargs", '{"messages": []}'],
       r"'messages' is set by efficientml"),
    # --- llm convert ----------------------------------------------------------------------------
    _c("llm-convert-gguf-exists", f"llm convert {LLM} {S}o.gguf", r"output .*o.gguf' already exists; .* --overwrite",
       fx.garbage("o.gguf")),
    _c("llm-convert-folder-exists", f"llm convert {LLM} {S}out", r"already exists", fx.user_folder("out")),
    _c("llm-convert-overwrite-user-folder", f"llm convert {LLM} {S}out --overwrite",
       r"holds files efficientml did not write \(e.g. 'notes.txt'\)", fx.user_folder("out")),
    _c("llm-convert-overwrite-dot", f"llm convert {LLM} . --overwrite", r"is the current folder", fx.user_folder(".")),
    _c("llm-convert-out-is-file", f"llm convert {LLM} {S}f --overwrite", r"is not a folder; expected a folder",
       fx.garbage("f")),
    _c("llm-convert-gguf-is-dir", f"llm convert {LLM} {S}o.gguf --overwrite", r"is a folder; expected a file",
       fx.folder("o.gguf")),
    _c("llm-convert-under-file", f"llm convert {LLM} {S}f/out", r"which is a file", fx.garbage("f")),
    _c("llm-convert-outtype", f"llm convert {LLM} {S}o.gguf --outtype q2_k", r"invalid choice: 'q2_k'"),
    # --- llm serve (refused before the model loads) ------------------------------------------------
    _c("llm-serve-port", f"llm serve {LLM} --port 70000", r"expected a TCP port 0-65535, got '70000'"),
    _c("llm-serve-open-host-no-key", f"llm serve {LLM} --host 0.0.0.0", r"reachable from other machines: give --api-key"),
    _c("llm-serve-key-and-no-auth", f"llm serve {LLM} --api-key k --no-auth", r"contradict each other"),
    _c("llm-serve-max-num-seqs-zero", f"llm serve {LLM} --max-num-seqs 0", r"expected a positive integer"),
    _c("llm-serve-kv-cache-zero", f"llm serve {LLM} --kv-cache-mb 0", r"expected a positive integer"),
    # --- llm quantize / prune -------------------------------------------------------------------
    _c("llm-q-no-out", f"llm quantize {LLM}", r"the following arguments are required: --out"),
    _c("llm-q-group-zero", f"llm quantize {LLM} --out {S}q --group-size 0", r"expected a positive integer, 'channel'"),
    _c("llm-q-group-negative", ["llm", "quantize", LLM, "--out", S + "q", "--group-size=-1"], r"expected a positive"),
    _c("llm-q-group-text", f"llm quantize {LLM} --out {S}q --group-size big", r"got 'big'"),
    _c("llm-q-group-not-dividing", f"llm quantize {LLM} --out {S}q --group-size 128 --method rtn",
       r"--group-size 128 does not divide the layer widths \[576, 1536\]; use --group-size 64"),
    _c("llm-q-bits", f"llm quantize {LLM} --out {S}q --w-bits 0", r"--w-bits must be an integer from 2 to 8, got 0"),
    _c("llm-q-bits-text", f"llm quantize {LLM} --out {S}q --w-bits four", r"invalid int value: 'four'"),
    _c("llm-q-method", f"llm quantize {LLM} --out {S}q --method hqq", r"invalid choice: 'hqq'"),
    _c("llm-q-out-exists", f"llm quantize {LLM} --out {S}q", r"already exists; .* --overwrite", fx.folder("q")),
    _c("llm-q-out-dot", f"llm quantize {LLM} --out . --overwrite", r"is the current folder", fx.user_folder(".")),
    _c("llm-q-out-dir-dot", f"llm quantize {LLM} --out {S}mydir/. --overwrite", r"holds files efficientml did not write",
       fx.user_folder("mydir")),
    _c("llm-q-out-parent-dot", f"llm quantize {LLM} --out {S}mydir/.. --overwrite", r"is the current folder|did not write",
       fx.user_folder("mydir")),
    _c("llm-q-out-is-file", f"llm quantize {LLM} --out {S}f --overwrite", r"is not a folder", fx.garbage("f")),
    _c("llm-q-calib-len", f"llm quantize {LLM} --out {S}q --calib-len 100000",
       r"--calib-len 100000 is longer than the model's 8192 positions"),
    _c("llm-q-calib-samples-zero", f"llm quantize {LLM} --out {S}q --calib-samples 0", r"expected a positive integer"),
    _c("llm-q-sink-share", f"llm quantize {LLM} --out {S}q --sink-share 1.5", r"expected a number in \[0, 1\)"),
    _c("llm-q-sink-share-nan", f"llm quantize {LLM} --out {S}q --sink-share nan", r"expected a number in \[0, 1\)"),
    _c("llm-q-alpha-nan", f"llm quantize {LLM} --out {S}q --alpha nan", r"expected a number in \[0, 1\]"),
    _c("llm-q-device", f"llm quantize {LLM} --out {S}q --device tpu9", r"expected cpu, cuda"),
    _c("llm-q-batch-zero", f"llm quantize {LLM} --out {S}q --batch-size 0", r"expected a positive integer"),
    _c("llm-q-float-dtype", f"llm quantize {LLM} --out {S}q --float-dtype fp8", r"invalid choice: 'fp8'"),
    _c("llm-q-model-missing", f"llm quantize {S}nope --out {S}q", r"nope"),
    _c("llm-q-gguf-head-count", f"llm quantize {S}h.gguf --out {S}q", r"head_count is 0",
       fx.gguf("h.gguf", head_count=0)),
    _c("llm-q-calib-latin1", f"llm quantize {LLM} --out {S}q --calib {S}c.txt", r"c.txt' is not UTF-8 text",
       fx.garbage("c.txt", "na\u00efve text ".encode("latin-1") * 50)),
    _c("llm-q-calib-dir", f"llm quantize {LLM} --out {S}q --calib {S}adir", r"is a folder; expected a file",
       fx.folder("adir")),
    _c("llm-chat-stdin-latin1", f"llm chat {LLM} --max-new-tokens 1", r"text read from stdin is not UTF-8 \(byte 0xe9\)",
       stdin="caf\u00e9\n".encode("latin-1")),
    _c("llm-prune-sparsity-one", f"llm prune {LLM} --out {S}p --sparsity 1", r"expected a number in \[0, 1\)"),
    _c("llm-prune-sparsity-nan", f"llm prune {LLM} --out {S}p --sparsity nan", r"expected a number in \[0, 1\)"),
    _c("llm-prune-n-m-order", f"llm prune {LLM} --out {S}p --n-m 4:2", r"expected N:M with 0 < N < M"),
    _c("llm-prune-n-m-text", f"llm prune {LLM} --out {S}p --n-m half", r"expected N:M such as 2:4"),
    _c("llm-prune-method", f"llm prune {LLM} --out {S}p --method random", r"invalid choice: 'random'"),
    _c("llm-prune-out-dot", f"llm prune {LLM} --out . --overwrite", r"is the current folder", fx.user_folder(".")),
    _c("llm-prune-out-user", f"llm prune {LLM} --out {S}mine --overwrite", r"did not write",
       fx.user_folder("mine")),
    _c("llm-prune-out-exists", f"llm prune {LLM} --out {S}p", r"already exists", fx.folder("p")),
    _c("llm-prune-calib-len", f"llm prune {LLM} --out {S}p --calib-len 9000", r"--calib-len 9000 is longer"),
    _c("llm-prune-readonly", f"llm prune {LLM} --out {S}ro/p", r"cannot write", fx.readonly("ro")),
    # --- finetune -----------------------------------------------------------------------------
    _c("finetune-no-out", f"finetune {LLM} --dataset tinyshakespeare", r"required: --out"),
    _c("finetune-no-data", f"finetune {LLM} --out {S}ft", r"one of the arguments --data --dataset is required"),
    _c("finetune-both-data", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --data {S}x.jsonl",
       r"not allowed with argument"),
    _c("finetune-method", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --method ia4", r"invalid choice: 'ia4'"),
    _c("finetune-rank-zero", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --rank 0",
       r"--rank: expected a positive integer"),
    _c("finetune-rank-too-large", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --rank 100000 --steps 1",
       r"LoRA rank 100000 is larger than layer .* allows"),
    _c("finetune-dropout", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --dropout 1.5",
       r"--dropout: expected a number in \[0, 1\)"),
    _c("finetune-lr-nan", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --lr nan", r"--lr: expected a positive"),
    _c("finetune-lr-negative", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --lr -1", r"--lr: expected a positive"),
    _c("finetune-alpha-inf", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --alpha inf",
       r"--alpha: expected a positive number"),
    _c("finetune-eval-rows", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --eval-rows -1",
       r"--eval-rows: expected a non-negative integer"),
    _c("finetune-targets-nomatch", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --targets nomatch --steps 1",
       r"LoRA target module 'nomatch' matches no linear layer"),
    _c("finetune-dataset-unknown", f"finetune {LLM} --out {S}ft --dataset nosuch", r"neither a known corpus"),
    _c("finetune-data-missing", f"finetune {LLM} --out {S}ft --data {S}none.jsonl", r"does not exist"),
    _c("finetune-data-folder", f"finetune {LLM} --out {S}ft --data {S}d", r"is a folder", fx.folder("d")),
    _c("finetune-data-fields", f"finetune {LLM} --out {S}ft --data {S}x.jsonl --steps 1",
       r"has fields \['foo'\]; expected 'messages'", fx.garbage("x.jsonl", b'{"foo": 1}\n')),
    _c("finetune-data-not-json", f"finetune {LLM} --out {S}ft --data {S}x.jsonl --steps 1",
       r"line 1 of .* is not valid JSON", fx.garbage("x.jsonl")),
    _c("finetune-data-not-utf8", f"finetune {LLM} --out {S}ft --data {S}x.jsonl --steps 1",
       r"is not UTF-8 text", fx.garbage("x.jsonl", b'{"text": "caf\xe9"}\n')),
    _c("finetune-model-unknown", f"finetune nosuchmodel --out {S}ft --dataset tinyshakespeare", r"neither a built-in name"),
    _c("finetune-out-exists", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare", r"already exists", fx.folder("ft")),
    _c("finetune-out-user", f"finetune {LLM} --out {S}mine --overwrite --dataset tinyshakespeare", r"did not write",
       fx.user_folder("mine")),
    _c("finetune-out-dot", f"finetune {LLM} --out . --overwrite --dataset tinyshakespeare", r"is the current folder",
       fx.user_folder(".")),
    _c("finetune-out-readonly", f"finetune {LLM} --out {S}ro/ft --dataset tinyshakespeare", r"cannot write",
       fx.readonly("ro")),
    _c("finetune-llm-cnn-method", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --method tinytl",
       r"--method tinytl is for CNNs of the zoo"),
    _c("finetune-bitfit-no-bias", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --method bitfit --steps 1",
       r"BitFit has nothing to train: it has no bias parameters.*--add-bias"),
    _c("finetune-virtual-tokens-zero", f"finetune {LLM} --out {S}ft --dataset tinyshakespeare --method prompt "
       "--virtual-tokens 0", r"--virtual-tokens: expected a positive integer"),
    _c("finetune-cnn-llm-method", f"finetune resnet20 --out {S}ft --dataset fashion-mnist --method prompt",
       r"--method prompt is for LLMs; a CNN such as 'resnet20' takes one of tinytl"),
    _c("finetune-cnn-data", f"finetune resnet20 --out {S}ft --data {S}x.jsonl --method tinytl",
       r"--data FILE.jsonl is for LLMs"),
    _c("finetune-cnn-dataset", f"finetune resnet20 --out {S}ft --dataset tinyshakespeare --method tinytl",
       r"unknown dataset 'tinyshakespeare'; expected one of"),
    _c("finetune-cnn-out-exists", f"finetune resnet20 --out {S}ft --dataset fashion-mnist --method tinytl",
       r"already exists", fx.folder("ft")),
]


def _cuda_cases() -> list[Case]:
    """``--device cuda`` is bad input only where this torch build has no usable CUDA."""
    import torch

    if torch.cuda.is_available():
        return []
    return [_c("llm-info-device-cuda", f"llm info {LLM} --device cuda", r"'cuda' is not available: this torch build"),
            _c("llm-q-device-cuda", f"llm quantize {LLM} --out {S}q --device cuda", r"'cuda' is not available")]


CASES += _cuda_cases()


def _snapshot(root: Path) -> dict[str, str]:
    """path → content hash of every file under ``root`` (folders as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            out[rel] = "special"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            try:
                out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
            except OSError:
                out[rel] = "unreadable"
    return out


def _argv(case: Case, tmp: Path) -> list[str]:
    return [a.replace("{tmp}/", f"{tmp}/").replace("{tmp}", str(tmp)) for a in case.argv]


@contextlib.contextmanager
def _stdin(spec):
    old = sys.stdin
    if spec == "closed":
        sys.stdin = None
    elif isinstance(spec, bytes):
        sys.stdin = io.TextIOWrapper(io.BytesIO(spec), encoding="utf-8")
    try:
        yield
    finally:
        sys.stdin = old


def run_case(case: Case, tmp_path: Path) -> dict:
    """Run one case in ``tmp_path`` (made the current folder meanwhile). Returns exit_code, stderr,
    traceback (an exception escaped main), one_line (exactly one error line, no other output on
    stderr except warnings), matched, files_lost (a file present before is gone or changed),
    stray_files (a new file or folder appeared) and ok (all as expected)."""
    from efficientml.cli.main import main

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(tmp_path)
    before = _snapshot(tmp_path)
    err, out = io.StringIO(), io.StringIO()
    here = os.getcwd()
    code, tb = None, False
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), _stdin(case.stdin):
            try:
                code = main(_argv(case, tmp_path))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 2
            except BaseException:  # noqa: BLE001 — what this suite exists to catch
                tb = True
                err.write(traceback.format_exc())
    finally:
        os.chdir(here)
        fx.restore_modes(tmp_path)
    after = _snapshot(tmp_path)
    stderr = err.getvalue()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("efficientml: error: ")]
    one_line = len(errors) == 1 and all(ln in errors or ln.startswith("efficientml: warning: ") for ln in lines)
    matched = bool(errors) and re.search(case.match, errors[0]) is not None
    lost = any(after.get(k) != v for k, v in before.items())
    stray = any(k not in before for k in after)
    res = {"name": case.name, "exit_code": code, "stderr": stderr, "traceback": tb or "Traceback" in stderr,
           "one_line": one_line, "matched": matched, "files_lost": lost, "stray_files": stray}
    res["ok"] = (code == case.code and not res["traceback"] and one_line and matched and not lost and not stray)
    return res


def summary(cases: list[Case] | None = None) -> dict:
    """Run every case (each in a fresh temporary folder) and count what went wrong."""
    results = []
    for case in cases if cases is not None else CASES:
        with tempfile.TemporaryDirectory(prefix="efficientml-bad-") as d:
            results.append(run_case(case, Path(d) / "case"))
    return {"bad_input_cases": len(results),
            "bad_input_tracebacks": sum(r["traceback"] for r in results),
            "bad_input_files_lost": sum(r["files_lost"] for r in results),
            "bad_input_stray_files": sum(r["stray_files"] for r in results),
            "bad_input_wrong_exit": sum(r["exit_code"] != 2 for r in results),
            "bad_input_unclear_message": sum(not (r["one_line"] and r["matched"]) for r in results),
            "failing": [r["name"] for r in results if not r["ok"]]}


if __name__ == "__main__":
    import json

    print(json.dumps(summary(), indent=2))
