"""The transform registry: dispatch by config type, options, the layer filter, copy vs in place, the one
result type and its JSON, and Config kinds."""

import dataclasses
import importlib
import json
import pkgutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import efficientml
from efficientml.core.config import Config
from efficientml.core.errors import ConfigError
from efficientml.core.transform import (LayerFilter, TransformResult, apply, as_filter, handler_for,
                                        options_of, register_transform, registered)


@dataclasses.dataclass(frozen=True)
class _Scale(Config):
    kind = "test_scale"
    factor: float = 2.0


@register_transform(_Scale)
def _scale(model, config, *, calib, filter, offset: float = 0.0):
    names = filter.select(model, (nn.Linear,))
    with torch.no_grad():
        for n in names:
            model.get_submodule(n).weight.mul_(config.factor).add_(offset)
    return TransformResult(model, config, "simulated", {n: config.factor for n in names},
                           {"calib_batches": None if calib is None else len(calib)})


@dataclasses.dataclass(frozen=True)
class _Unregistered(Config):
    kind = "test_unregistered"


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(),
                         nn.Sequential(nn.Conv1d(8, 8, 1), nn.Linear(8, 8)), nn.Linear(8, 2))


def test_dispatch_by_config_type_and_options():
    m = _net()
    res = apply(m, _Scale(3.0), calib=[1, 2], inplace=True, offset=1.0)
    assert res.model is m and res.layers == {"0": 3.0, "2.1": 3.0, "3": 3.0}
    assert res.report == {"calib_batches": 2}
    assert options_of(_scale) == ["offset"]
    assert handler_for(_Scale()) is _scale and "_Scale" in registered()
    with pytest.raises(ConfigError, match=r"_Scale does not take option\(s\) \['batch_size'\]; its options are \['offset'\]"):
        apply(m, _Scale(), batch_size=4)
    with pytest.raises(ConfigError, match="a transform for _Scale is already registered"):
        register_transform(_Scale)(_scale)


def test_unregistered_config_lists_the_registered_ones():
    import efficientml.prune  # noqa: F401 — registers PruneConfig
    import efficientml.quant  # noqa: F401 — registers the CNN quantization configs

    with pytest.raises(ConfigError, match=r"no transform is registered for _Unregistered; .*IntegerConfig.*PruneConfig"):
        apply(_net(), _Unregistered())
    with pytest.raises(ConfigError, match="apply\\(\\) takes a Config instance"):
        apply(_net(), {"kind": "prune"})


def test_copy_by_default_in_place_on_request():
    m = _net()
    before = m[0].weight.detach().clone()
    res = apply(m, _Scale(2.0))
    assert res.model is not m and torch.equal(m[0].weight, before)          # the input is untouched
    assert torch.equal(res.model[0].weight, 2 * before)
    res = apply(m, _Scale(2.0), inplace=True)
    assert res.model is m and torch.equal(m[0].weight, 2 * before)


def test_filter_by_name_glob_type_and_exclude():
    m = _net()
    sel = lambda f: as_filter(f).select(m, (nn.Linear,))  # noqa: E731
    assert sel(None) == ["0", "2.1", "3"]                                    # the default types
    assert sel("3") == ["3"] and sel(["3", "0"]) == ["0", "3"]               # model order
    assert sel("2.*") == ["2.1"]                                             # a glob matches the types only
    assert sel("2.0") == ["2.0"]                                             # an exact name is taken as given
    assert sel(nn.Conv1d) == ["2.0"]
    with pytest.raises(ConfigError, match="model has no layer named 'Conv1d'"):
        sel("Conv1d")                                                        # a str is a name, not a type
    assert sel(LayerFilter(types=("Conv1d", nn.Linear))) == ["0", "2.0", "2.1", "3"]
    assert sel(LayerFilter(exclude=("3",))) == ["0", "2.1"]
    assert sel(LayerFilter(exclude=("2.*",))) == ["0", "3"]
    assert sel({"types": [nn.Linear, nn.Conv1d], "exclude_types": [nn.Conv1d]}) == ["0", "2.1", "3"]
    with pytest.raises(ConfigError, match="model has no layer named '9'"):
        sel("9")
    with pytest.raises(ConfigError, match="model has no layer named 'x'"):
        sel(LayerFilter(exclude=("x",)))
    with pytest.raises(ConfigError, match=r"layer glob 'head\.\*' matches no Linear layer"):
        sel("head.*")
    with pytest.raises(ConfigError, match="unknown key"):
        as_filter({"layers": ["0"]})
    with pytest.raises(ConfigError, match="a layer filter is"):
        as_filter([3])
    assert apply(m, _Scale(), filter=LayerFilter(include=("3",))).layers == {"3": 2.0}


def test_result_to_dict_is_json_and_round_trips_the_config():
    res = apply(_net(), _Scale(1.5), filter="3")
    d = json.loads(json.dumps(res.to_dict()))
    assert d == {"config": {"factor": 1.5, "__kind__": "test_scale"}, "path": "simulated",
                 "layers": {"3": 1.5}, "report": {"calib_batches": None}}
    assert _Scale.from_dict(d["config"]) == _Scale(1.5)
    assert LayerFilter(include=("a",), types=(nn.Linear,)).to_dict() == \
        {"include": ["a"], "exclude": [], "types": ["Linear"], "exclude_types": []}


def test_from_dict_checks_the_kind():
    from efficientml.prune import PruneConfig
    from efficientml.quant import IntegerConfig

    d = PruneConfig(sparsity=0.25).to_dict()
    assert PruneConfig.from_dict(d) == PruneConfig(sparsity=0.25)
    assert PruneConfig.from_dict({"sparsity": 0.25}) == PruneConfig(sparsity=0.25)  # no kind: this class's
    with pytest.raises(ConfigError, match="IntegerConfig.from_dict got a config of kind 'prune'; expected kind "
                                          "'integer_int8'"):
        IntegerConfig.from_dict(d)


def _all_config_classes():
    for info in pkgutil.walk_packages(efficientml.__path__, "efficientml."):
        if ".cli" not in info.name and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    todo, out = list(Config.__subclasses__()), []
    while todo:
        c = todo.pop()
        out.append(c)
        todo.extend(c.__subclasses__())
    return [c for c in out if c.__module__.startswith("efficientml.")]


def test_every_config_has_its_own_kind():
    classes = _all_config_classes()
    kinds = {}
    for c in classes:
        assert c.kind != "config", f"{c.__name__} keeps the base kind"
        assert c.kind not in kinds, f"{c.__name__} and {kinds[c.kind]} share kind {c.kind!r}"
        kinds[c.kind] = c.__name__
    assert len(kinds) == len(classes) >= 20
    assert kinds["prune"] == "PruneConfig" and kinds["llm_prune"] == "LLMPruneConfig"


def test_every_technique_is_registered():
    _all_config_classes()
    assert set(registered()) >= {
        "IntegerConfig", "WeightOnlyConfig", "KMeansConfig", "AdaRoundConfig", "QATConfig", "BinaryConfig",
        "DeepCompressionConfig", "PruneConfig", "RTNConfig", "AWQConfig", "GPTQConfig", "SmoothQuantConfig",
        "LLMPruneConfig", "KVCacheQuantConfig"}


def test_efficientml_apply_is_lazy():
    from efficientml.core import transform

    assert efficientml.apply is transform.apply and efficientml.LayerFilter is LayerFilter
    code = ("import sys, efficientml; assert 'efficientml.core.transform' not in sys.modules; "
            "efficientml.apply; assert 'efficientml.core.transform' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        efficientml.nope  # noqa: B018
