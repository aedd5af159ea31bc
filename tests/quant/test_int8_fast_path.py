"""The int8 fast path (issue #16, part 2 item 5): its speed must not depend on the batch size of the
first call (packed weights are kept per input shape, shared by ``with_mode`` copies), and where int8
depthwise kernels lose to fp32 one warning names the layers."""

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch

import efficientml.quant.int8_speed as int8_speed
from efficientml.models.tf_style import tf_style_mobilenet
from efficientml.quant.int8_speed import Int8SpeedWarning
from efficientml.quant.integer import IntegerConfig, IntegerModel, _run, convert_integer
from efficientml.quant.integer_weighted import ConvStep


@pytest.fixture(scope="module")
def tf_int8():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    return convert_integer(tf_style_mobilenet(), [x], IntegerConfig(warn_slow_layers=False)), x


def _convs(im):
    return [ins.step for ins in im.program.instrs if isinstance(ins.step, ConvStep)]


def test_packs_are_per_input_shape_and_shared_by_with_mode_copies(tf_int8):
    base, x = tf_int8
    im = copy.deepcopy(base)
    fast = im.with_mode("fast")
    with torch.no_grad():
        fast(x)                                                   # first call: batch 8
        other = im.with_mode("fast")
        other(x[:1])                                              # a copy, batch 1
    threads = torch.get_num_threads()
    for st in _convs(im):
        keys = sorted(k[0][0] for k in st._packs)
        assert keys == [1, 8] and all(k[1] == threads for k in st._packs)
    # the batch-1 pack was created by a batch-1 call, as in a model whose first call had batch 1
    fresh = copy.deepcopy(base).with_mode("fast")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x[:1]), other(x[:1]), rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(im))                        # packs are dropped, rebuilt on use
    assert all(st._packs == {} for st in _convs(clone))
    with torch.no_grad():
        torch.testing.assert_close(clone.with_mode("fast")(x[:1]), other(x[:1]), rtol=0, atol=0)


def test_latency_after_a_batch_8_first_call_equals_latency_after_batch_1(tf_int8):
    base, x = tf_int8
    ratio = int8_speed.first_call_batch_latency_ratio(base, x)          # x has batch 8
    assert ratio <= 1.1, ratio


def test_slow_depthwise_int8_layers_are_named_in_one_warning(tf_int8, monkeypatch):
    base, x = tf_int8
    im = copy.deepcopy(base)
    im = IntegerModel(im.program, dataclasses.replace(im.config, warn_slow_layers=True), "integer")
    dw = [st.name for st in _convs(im) if st.depthwise]
    assert len(dw) == 5
    slow = set(dw[:2])
    monkeypatch.setattr(int8_speed, "time_layer", lambda st, q: (2.0, 1.0) if st.name in slow else (1.0, 2.0))
    fast = im.with_mode("fast")
    with pytest.warns(Int8SpeedWarning) as rec, torch.no_grad():
        fast(x[:2])
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "2 of 5 depthwise layers" in msg and all(n in msg for n in slow)
    assert not any(n in msg for n in set(dw) - slow)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Int8SpeedWarning)          # once per program, copies included
        with torch.no_grad():
            fast(x[:2]), im.with_mode("fast")(x[:1])


def test_real_timings_are_measured_for_every_depthwise_layer(tf_int8):
    base, x = tf_int8
    st = next(st for st in _convs(base) if st.depthwise)
    q_in = None

    def grab(ins, out, args):
        nonlocal q_in
        if ins.step is st:
            q_in = args[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(base.program, "fast", (x[:1],), grab)
        i8, f32 = int8_speed.time_layer(st, q_in)
    assert i8 > 0 and f32 > 0
    assert int8_speed.slow_layers({"a": (2.0, 1.0), "b": (1.05, 1.0), "c": (0.5, 1.0)}) == {"a": (2.0, 1.0)}
    with warnings.catch_warnings():                # one layer 0.03 ms slower of 17 (timer noise): quiet
        warnings.simplefilter("error", Int8SpeedWarning)
        noise = {f"l{i}": (0.14 if i == 0 else 0.1, 0.11 if i == 0 else 0.12) for i in range(17)}
        assert list(int8_speed.warn_if_slow(noise)) == ["l0"]
