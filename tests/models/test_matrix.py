"""The model matrix (tests/models/matrix.py): seven standard architectures we did not design, each
profiled, channel-pruned, converted to int8 and exported to ONNX Runtime, at 32×32 for speed.

Every (model, step) passes with its numbers, or is listed in EXPECTED_FAIL with the op its failure
must name. An entry that starts passing is fine (the step's numbers are then checked); delete it.
"""

import pytest
import torch
import torch.nn as nn

from efficientml.models import build_model
from tests.models.matrix import MODELS, PRUNE_RATIO, SQNR_MIN_DB, run_model, step_profile

# (model, step) → words the failure must contain. Empty: every model passes every step (hard-swish,
# SiLU, sigmoid and hard-sigmoid are integer tables, squeeze-excite products, concatenation and the
# channel split/shuffle integer steps, all exported to ORT with every conv as QLinearConv).
EXPECTED_FAIL: dict[tuple[str, str], tuple[str, ...]] = {}


@pytest.fixture(scope="module")
def matrix():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_model(name, resolution=32, batch=4, steps=("prune", "int8", "onnx"))
        return cache[name]

    return get


def _independent_macs(model, x):
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            total += out.numel() // out.shape[0] * mod.weight[0].numel()
        elif isinstance(mod, nn.Linear):
            total += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", list(MODELS))
def test_profile_matches_published_figures(name):
    params, published, exact = MODELS[name]
    rec = step_profile(name)
    assert (rec["params"], rec["macs"]) == (params, exact)
    assert abs(exact - published) / published <= 0.02
    with torch.device("meta"):
        meta = build_model(name)
    assert _independent_macs(meta, torch.empty(1, 3, 224, 224, device="meta")) == exact


def _expect(name, step, rec):
    words = EXPECTED_FAIL.get((name, step))
    if rec["ok"] or words is None:
        assert rec["ok"], rec
        return
    assert "error" in rec and any(w in rec["error"] for w in words), rec
    pytest.xfail(rec["error"])


@pytest.mark.parametrize("name", list(MODELS))
def test_channel_prune(name, matrix):
    rec = matrix(name)["prune"]
    assert rec["equal_at_ratio_0"] and rec["params_after"] < rec["params_before"], rec
    _expect(name, "prune", rec)


@pytest.mark.parametrize("name", list(MODELS))
def test_int8(name, matrix):
    rec = matrix(name)["int8"]
    if rec.get("sqnr_db") is not None:          # with float fallbacks each one is a requantization
        assert rec["sqnr_db"] >= (SQNR_MIN_DB if rec["float_layers"] == 0 else 15.0), rec
    _expect(name, "int8", rec)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_runtime(name, matrix):
    pytest.importorskip("onnxruntime")
    rec = matrix(name)["onnx"]
    if "qlinearconv" in rec:                    # exported and run: ORT stays close to fp32
        assert rec["ort_vs_fp32_sqnr_db"] >= SQNR_MIN_DB, rec
    _expect(name, "onnx", rec)


def test_prune_ratio_is_the_documented_one():
    assert PRUNE_RATIO == 0.3
