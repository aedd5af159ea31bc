"""The benchmark record machinery: merging parts run separately, recomputed verdicts, part selection."""

import argparse
import json

import pytest

from efficientml.analysis.record import (BenchmarkRecord, add_part_options, default_out, find_checkpoint,
                                         merge_records, merge_results, merge_targets, read_record, run_parts,
                                         run_benchmark, selected_parts, target_met)
from efficientml.core.errors import ConfigError


def _doc(part: str, value: float, commit: str, threshold: float = 2.0) -> dict:
    rec = BenchmarkRecord("demo", command=f"python demo.py --parts {part}", commit=commit,
                          created=f"2026-01-0{1 if commit == 'aaa' else 2}T00:00:00Z")
    rec.results = {part: {"value": value}, "runs": [{"parts": [part], "git_commit": commit}],
                   "ppl": {f"{part}_row": value}}
    rec.target(f"{part}_speedup", value, ">=", threshold)
    return {"benchmark": rec.name, "created": rec.created, "git_commit": rec.commit, "command": rec.command,
            "machine": {}, "results": rec.results, "targets": rec.targets}


def test_merge_of_two_partial_records_keeps_both_parts():
    a, b = _doc("decode", 2.5, "aaa"), _doc("ppl", 1.5, "bbb")
    rec = merge_records([a, b])
    assert rec.name == "demo"
    assert rec.results["decode"] == {"value": 2.5}
    assert rec.results["ppl"] == {"decode_row": 2.5, "ppl_row": 1.5}       # one level deep: both rows
    assert [r["git_commit"] for r in rec.results["runs"]] == ["aaa", "bbb"]  # runs accumulate
    assert [t["id"] for t in rec.targets] == ["decode_speedup", "ppl_speedup"]
    assert [t["met"] for t in rec.targets] == [True, False]
    assert rec.command == "python demo.py --parts decode ; python demo.py --parts ppl"
    assert (rec.commit, rec.created) == ("aaa", "2026-01-01T00:00:00Z")   # the first record's
    assert a["results"]["ppl"] == {"decode_row": 2.5}                      # inputs are not modified


def test_merge_recomputes_met_and_later_target_wins():
    old = _doc("decode", 2.5, "aaa")
    old["targets"][0]["met"] = False          # a stale verdict in a file
    new = _doc("decode", 1.0, "bbb")
    new["targets"][0]["met"] = True           # wrong the other way
    assert merge_records([old]).targets[0]["met"] is True                  # 2.5 >= 2.0
    rec = merge_records([old, new])
    assert len(rec.targets) == 1
    assert rec.targets[0]["value"] == 1.0 and rec.targets[0]["met"] is False  # 1.0 >= 2.0 is false
    assert rec.results["decode"] == {"value": 1.0}


def test_met_for_each_op_and_unmeasured():
    assert target_met(0.25, "<=", 0.25) and not target_met(0.26, "<=", 0.25)
    assert target_met(3, "==", 3) and not target_met(3.0001, "==", 3)
    assert target_met(0.99, "<", 1.0) and not target_met(1.0, "<", 1.0)
    assert not target_met(None, ">=", 0.0)
    with pytest.raises(ConfigError, match="op must be one of"):
        target_met(1.0, "=>", 0.0)
    ts = merge_targets([{"id": "x", "value": None, "op": ">=", "threshold": 1.0, "met": True, "note": "n/a"}])
    assert ts == [{"id": "x", "value": None, "op": ">=", "threshold": 1.0, "met": False, "note": "n/a"}]


def test_merge_results_rules():
    into = {"runs": [1], "table": {"a": 1, "b": 2}, "n": 1, "only_old": "x"}
    merge_results(into, {"runs": [2, 3], "table": {"b": 20, "c": 3}, "n": 5})
    assert into == {"runs": [1, 2, 3], "table": {"a": 1, "b": 20, "c": 3}, "n": 5, "only_old": "x"}


def test_written_record_reads_back_and_merges(tmp_path):
    p1, p2 = tmp_path / "a.json", tmp_path / "b.json"
    p1.write_text(json.dumps(_doc("decode", 3.0, "aaa")))
    p2.write_text(json.dumps(_doc("ppl", 4.0, "bbb")))
    out = merge_records([read_record(p1), read_record(p2)]).write(tmp_path / "m.json")
    doc = json.loads(out.read_text())
    assert set(doc) == {"benchmark", "created", "git_commit", "command", "machine", "results", "targets"}
    assert {t["id"]: t["met"] for t in doc["targets"]} == {"decode_speedup": True, "ppl_speedup": True}
    back = BenchmarkRecord.from_dict(doc)
    assert back.results == doc["results"] and back.targets == doc["targets"] and back.commit == "aaa"
    with pytest.raises(ConfigError, match="does not exist"):
        read_record(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="is not a benchmark record"):
        read_record(tmp_path / "x.json")
    with pytest.raises(ConfigError, match="at least one"):
        merge_records([])


def test_parts_selection_and_runner():
    order = []
    parts = {"fp": lambda s: order.append(("fp", s)), "w4": lambda s: order.append(("w4", s)),
             "kv": lambda s: order.append(("kv", s))}
    assert selected_parts(parts, None) == ["fp", "w4", "kv"]
    assert selected_parts(parts, "kv,fp") == ["fp", "kv"]                   # table order
    assert selected_parts(parts, None, ["kv"], "w4") == ["kv"]              # first spec given wins
    assert selected_parts(parts, "all") == ["fp", "w4", "kv"]
    with pytest.raises(ConfigError, match=r"unknown benchmark part 'w3' \(did you mean 'w4'\?\)"):
        selected_parts(parts, "w3")
    done = []
    secs = run_parts(parts, ["w4", "kv"], "state", after=lambda name, seconds: done.append(name))
    assert order == [("w4", "state"), ("kv", "state")] and done == ["w4", "kv"] and list(secs) == ["w4", "kv"]
    ap = argparse.ArgumentParser()
    add_part_options(ap, parts)
    args = ap.parse_args(["--parts", "fp", "--quick", "--merge", "a.json", "b.json"])
    assert (args.parts, args.quick, args.merge, args.out) == ("fp", True, ["a.json", "b.json"], None)


def test_quick_never_writes_into_results(tmp_path):
    assert default_out("pruning", quick=True).parent != default_out("pruning", quick=False).parent
    assert default_out("pruning", quick=False).name == "pruning.json"
    assert default_out("pruning", quick=True, out=tmp_path / "p.json") == tmp_path / "p.json"
    (tmp_path / "b.safetensors").write_bytes(b"x")
    assert find_checkpoint(["a.safetensors", "b.safetensors"], folder=tmp_path) == tmp_path / "b.safetensors"
    assert find_checkpoint(["a.safetensors"], folder=tmp_path) is None
    assert find_checkpoint(["a.safetensors"], explicit="x/y.safetensors", folder=tmp_path).name == "y.safetensors"


def test_run_benchmark_runs_parts_then_merges_their_files(tmp_path):
    """A main's tail: selected parts on the state, a write after each; --merge folds the part files, a
    part's "not measured" target never hiding another's value, each run's provenance kept."""
    def part(name, value):
        def run(rec):
            rec.results[name] = {"speedup": value}
            rec.target(f"{name}_speedup", value, ">=", 2.0)
        return run

    parts = {"fp": part("fp", 3.0), "w4": part("w4", 1.5)}
    ap = argparse.ArgumentParser()
    add_part_options(ap, parts)

    def missing(rec):
        if "w4_speedup" not in {t["id"] for t in rec.targets}:
            rec.target("w4_speedup", None, ">=", 2.0, note="not measured: part w4 not run")

    for part in parts:
        args = ap.parse_args(["--parts", part, "--out", str(tmp_path / f"{part}.json")])
        assert run_benchmark("demo", parts, args, lambda rec, out: rec, finish=missing) == 0
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert [t["value"] for t in fp["targets"]] == [3.0, None] and list(fp["results"]["seconds"]) == ["fp"]
    args = ap.parse_args(["--merge", str(tmp_path / "w4.json"), str(tmp_path / "fp.json"),
                          "--out", str(tmp_path / "all.json")])
    run_benchmark("demo", parts, args, None, finish=missing)
    merged = json.loads((tmp_path / "all.json").read_text())
    assert {t["id"]: t["value"] for t in merged["targets"]} == {"w4_speedup": 1.5, "fp_speedup": 3.0}
    assert [p["parts"] for p in merged["results"]["provenance"]] == [["w4"], ["fp"]]
    assert merged["results"]["fp"] == {"speedup": 3.0} and merged["results"]["w4"] == {"speedup": 1.5}
    args = ap.parse_args(["--merge", str(tmp_path / "all.json"), str(tmp_path / "fp.json"),
                          "--out", str(tmp_path / "again.json")])
    run_benchmark("demo", parts, args, None)  # a merge of a merge keeps the runs it lists
    again = json.loads((tmp_path / "again.json").read_text())
    assert [p["parts"] for p in again["results"]["provenance"]] == [["w4"], ["fp"], ["fp"]]
