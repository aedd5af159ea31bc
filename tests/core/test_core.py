import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

from efficientml.core import Config, ConfigError, Registry
from efficientml.core.config import check_range
from efficientml.core.modules import get_module, named_layers, set_module
from efficientml.core.serialization import (atomic_dir, atomic_path, load_state_dict, save_state_dict,
                                            write_json)
from efficientml.core.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class _Cfg(Config):
    kind = "demo"
    ratio: float = 0.5
    dims: tuple = (1, 2)

    def validate(self):
        check_range("ratio", self.ratio, 0.0, 1.0, hi_open=True)


def test_config_json_round_trip_and_validation():
    c = _Cfg(ratio=0.25, dims=(3, 4))
    assert _Cfg.from_json(c.to_json()) == c
    with pytest.raises(ConfigError, match=r"ratio must be in \[0.0, 1.0\), got 1.5"):
        _Cfg(ratio=1.5)
    with pytest.raises(ConfigError, match="unknown field"):
        _Cfg.from_dict({"ratio": 0.1, "nope": 1})


def test_registry_suggests_close_names():
    r: Registry[int] = Registry("widget")
    r.register("alpha", 1)
    assert r.get("ALPHA") == 1 and "alpha" in r
    with pytest.raises(ConfigError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\)"):
        r.get("alpah")


def test_module_surgery_by_dotted_name():
    m = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    assert get_module(m, "1.1").out_features == 1
    old = set_module(m, "1.1", nn.Linear(3, 5))
    assert old.out_features == 1 and m(torch.zeros(1, 2)).shape == (1, 5)
    assert [n for n, _ in named_layers(m, (nn.Linear,))] == ["0", "1.1"]
    with pytest.raises(ConfigError, match="model has no layer named '1.7'"):
        get_module(m, "1.7")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_atomic_dir_refuses_existing_and_cleans_up(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as d:
        (d / "w.txt").write_text("x")
    assert (out / "w.txt").read_text() == "x"
    with pytest.raises(ConfigError, match="already exists"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "other") as d:
            (d / "partial").write_text("y")
            raise RuntimeError("crash")
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_safetensors_round_trip_and_corrupt_file(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    p = tmp_path / "x.safetensors"
    save_state_dict(p, sd)
    back = load_state_dict(p)
    assert torch.equal(back["a"], sd["a"]) and torch.equal(back["b"], sd["b"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(p.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(bad)


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, efficientml, efficientml.models, efficientml.analysis, efficientml.train;"
            "import torch;"
            "bad=[m for m in ('matplotlib','triton','transformers') if m in sys.modules];"
            "assert not bad, bad; assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_atomic_writes_get_normal_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
