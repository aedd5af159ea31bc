"""The benchmark scripts on the shared machinery: their part tables, the old option spellings, and
merges that keep every committed number."""

import importlib.util
import json
from pathlib import Path

import pytest

from efficientml.analysis.record import selected_parts

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_part_tables_and_old_spellings():
    pr = script("pruning")
    assert list(pr.PARTS) == ["gpu", "finegrained", "channel", "netadapt", "criteria", "resnet"]
    a = pr.parse_args(["--full", "--part", "resnet", "--part", "channel"])
    b = pr.parse_args(["--full", "--parts", "channel,resnet"])
    assert selected_parts(pr.PARTS, a.parts, a.part) == selected_parts(pr.PARTS, b.parts, b.part) == ["channel", "resnet"]
    lc = script("llm_compression")
    assert selected_parts(lc.PARTS, None, None, lc.DEFAULT_PARTS) == [
        "fp", "calib", "w4", "w3", "w4pc", "ood", "calib_ablation", "formats", "sq", "prune", "kv", "mem", "real"]
    a = lc.parse_args(["--sections", "fp,kv"])
    assert selected_parts(lc.PARTS, a.parts, a.sections, lc.DEFAULT_PARTS) == ["fp", "kv"]
    core = script("llm_core")
    assert list(core.PARTS) == ["ppl", "decode", "decode-batch", "gpu"]


def test_pruning_merge_keeps_the_committed_numbers(tmp_path):
    pr = script("pruning")
    out = tmp_path / "pruning.json"
    assert pr.merge([str(RESULTS / "pruning.json")], out) == 0
    old, new = json.loads((RESULTS / "pruning.json").read_text()), json.loads(out.read_text())
    assert new["results"] == old["results"]
    assert new["targets"] == old["targets"]
    assert (new["git_commit"], new["created"]) == (old["git_commit"], old["created"])


@pytest.mark.parametrize("files", [1, 2])
def test_gpu_merge_keeps_the_committed_numbers(tmp_path, files):
    core = script("llm_core")
    run = json.loads((RESULTS / "llm_core_gpu.json").read_text())["results"]["superseded_run"]  # a real GPU record
    src = tmp_path / "llm_core_gpu.json"
    src.write_text(json.dumps({"benchmark": "llm_core", **run}))
    out = tmp_path / "gpu.json"
    core.merge_gpu([str(src)] * files, out)
    old, new = json.loads(src.read_text()), json.loads(out.read_text())
    n = len(old["results"]["runs"])
    assert len(new["results"]["runs"]) == n * files                   # a second copy's runs are renumbered
    assert [r["run"] for r in new["results"]["runs"]] == list(range(n * files))

    def rows(doc: dict) -> dict:  # every measured row, without the run it is credited to
        return {k: {kk: vv for kk, vv in v.items() if kk != "run"}
                for k, v in doc["results"]["smollm2_135m"].items() if isinstance(v, dict)}

    assert rows(new) == rows(old) and rows(old)
    if files == 1:
        assert new["results"] == old["results"] and new["targets"] == old["targets"]
