"""Benchmark records in the schema of BENCHMARKS.md: machine, command, commit, results, targets.

    rec = BenchmarkRecord("pruning")
    rec.results["vgg"] = {...}
    rec.target("finegrained_size_ratio", 0.233, "<=", 0.25, note="nonzero / dense fp32 weights")
    rec.write()          # benchmarks/results/pruning.json (atomically)

The machinery every script in benchmarks/ shares lives here too: ``log``, ``find_checkpoint``,
``merge_records`` (fold records of parts run separately into one) and the part runner: a benchmark's
main is a table of named parts, ``PARTS = {"decode": part_decode, ...}``, each a function of the
benchmark's own state, run by ``run_parts`` over the names ``--parts`` selects:

    ap = argparse.ArgumentParser(); add_part_options(ap, PARTS)
    args = ap.parse_args()
    run_parts(PARTS, selected_parts(PARTS, args.parts), state, after=lambda name: rec.write(out))

or all of a main's tail at once, ``--merge`` included: ``return run_benchmark("nas", PARTS, args, make_state)``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientml.core.errors import ConfigError

_OPS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "==": lambda v, t: v == t,
        "<": lambda v, t: v < t, ">": lambda v, t: v > t}

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def log(*parts: object) -> None:
    """One progress line, time-stamped, flushed at once (benchmarks run for hours under nohup)."""
    print(time.strftime("[%H:%M:%S]"), *parts, flush=True)


def find_checkpoint(names: list[str] | tuple[str, ...], explicit: str | os.PathLike | None = None,
                    folder: Path | None = None) -> Path | None:
    """``explicit`` if given, else the first of ``names`` that exists in ``folder`` (default
    <repo>/checkpoints); None when there is none (the caller says what to train)."""
    if explicit is not None:
        return Path(explicit)
    folder = REPO_ROOT / "checkpoints" if folder is None else folder
    return next((folder / n for n in names if (folder / n).is_file()), None)


def target_met(value: float | None, op: str, threshold: float) -> bool:
    """``value op threshold``; a value that was not measured (None) never meets its target."""
    if op not in _OPS:
        raise ConfigError(f"a target's op must be one of {list(_OPS)}, got {op!r}")
    return bool(value is not None and _OPS[op](value, threshold))


def git_commit() -> str:
    """HEAD (with ``-dirty`` for uncommitted changes to tracked files); ``EFFICIENTML_GIT_COMMIT`` wins,
    for copied trees whose .git is absent or stale (e.g. a GPU machine)."""
    if os.environ.get("EFFICIENTML_GIT_COMMIT"):
        return os.environ["EFFICIENTML_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        sha = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "unknown"
        dirty = ""
    return sha + ("-dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str | None = None) -> dict[str, Any]:
    import torch

    if device is None:
        device = "cpu"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.device(device))
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


@dataclass
class BenchmarkRecord:
    name: str
    device: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    command: str = field(default_factory=lambda: "python " + " ".join(sys.argv))
    commit: str = field(default_factory=git_commit)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc)
                         .strftime("%Y-%m-%dT%H:%M:%SZ"))

    def target(self, id: str, value: float | None, op: str, threshold: float, note: str = "") -> bool:
        """Record one target; ``value=None`` means it could not be measured (note says why)."""
        met = target_met(value, op, threshold)
        entry = {"id": id, "value": value, "op": op, "threshold": threshold, "met": met}
        if note:
            entry["note"] = note
        self.targets = [t for t in self.targets if t["id"] != id] + [entry]
        return met

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": self.name, "created": self.created, "git_commit": self.commit,
                "command": self.command, "machine": machine_info(self.device),
                "results": self.results, "targets": self.targets}

    def write(self, path: str | os.PathLike | None = None) -> Path:
        from efficientml.core.serialization import write_json

        p = Path(path) if path is not None else RESULTS_DIR / f"{self.name}.json"
        write_json(p, self.to_dict())
        return p

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "BenchmarkRecord":
        """A record read back from its JSON (the machine is re-read when it is written again)."""
        return cls(doc["benchmark"], results=doc.get("results", {}), targets=list(doc.get("targets", [])),
                   command=doc.get("command", ""), commit=doc.get("git_commit", "unknown"),
                   created=doc.get("created", ""))


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A benchmark JSON as a dict, with a clear error for a missing or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"benchmark record {p} does not exist; expected a JSON written by benchmarks/*.py")
    doc = json.loads(p.read_text())
    if not isinstance(doc, dict) or "results" not in doc:
        raise ConfigError(f"{p} is not a benchmark record (expected keys benchmark, results, targets)")
    return doc


# results keys whose lists accumulate over merged runs (each entry names its own commit)
CONCAT_KEYS = ("runs",)


def merge_results(into: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Fold ``new`` into ``into`` (in place): a dict is merged one level deep (later rows win), a list
    under CONCAT_KEYS is concatenated, anything else is replaced by the later value."""
    for k, v in new.items():
        old = into.get(k)
        if k in CONCAT_KEYS and isinstance(old, list) and isinstance(v, list):
            into[k] = old + v
        elif isinstance(old, dict) and isinstance(v, dict):
            into[k] = {**old, **v}
        else:
            into[k] = v
    return into


def merge_targets(*target_lists: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Targets by id, later lists win; ``met`` is recomputed from value, op and threshold, so a merged
    file can never carry a stale verdict."""
    by_id: dict[str, dict[str, Any]] = {}
    for targets in target_lists:
        for t in targets:
            by_id.pop(t["id"], None)  # re-insert: the order is that of the latest run
            by_id[t["id"]] = dict(t, met=target_met(t.get("value"), t["op"], t["threshold"]))
    return list(by_id.values())


def merge_records(docs: list[dict[str, Any]], name: str | None = None) -> BenchmarkRecord:
    """One record from several (parts run separately, or an earlier merge plus new parts).

    Results merge as in ``merge_results`` and targets as in ``merge_targets``, in the order given; the
    command lists every run's command (" ; "), and the creation time and commit are the first
    record's: the file stays the one it was, with parts added."""
    if not docs:
        raise ConfigError("merge_records needs at least one benchmark record")
    rec = BenchmarkRecord(name or docs[0]["benchmark"], command=" ; ".join(d.get("command", "") for d in docs),
                          commit=docs[0].get("git_commit", "unknown"), created=docs[0].get("created", ""))
    for d in docs:
        merge_results(rec.results, json.loads(json.dumps(d.get("results", {}))))  # a deep copy
    rec.targets = merge_targets(*(d.get("targets", []) for d in docs))
    return rec


# ------------------------------------------------------------------------------------ the part runner
def add_part_options(ap: Any, parts: dict[str, Any], *, quick: bool = True, merge: bool = True,
                     out: bool = True) -> None:
    """The options every benchmark shares: ``--parts a,b`` (default: all), ``--quick``, ``--out``
    and ``--merge A.json B.json``. A script keeps its older spellings (``--part``, ``--sections``…)
    as aliases that feed the same selection."""
    ap.add_argument("--parts", default=None, metavar="A,B",
                    help=f"comma-separated parts to run (default: all of {', '.join(parts)})")
    if quick:
        ap.add_argument("--quick", action="store_true",
                        help="tiny budgets for tests and CI; the JSON goes to a temporary file unless --out")
    if out:
        ap.add_argument("--out", default=None, help="where to write the JSON (default benchmarks/results/)")
    if merge:
        ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="fold these records (parts run separately) into one, written to --out")


def selected_parts(parts: dict[str, Any], *specs: str | list[str] | None) -> list[str]:
    """Part names in table order from comma-separated or listed specs (the first spec given wins;
    none or "all" means every part). An unknown name is refused with the names that exist."""
    import difflib

    spec = next((s for s in specs if s), None)
    if spec is None:
        return list(parts)
    names = [n.strip() for item in ([spec] if isinstance(spec, str) else spec) for n in item.split(",")]
    names = [n for n in names if n]
    if "all" in names:
        return list(parts)
    for n in names:
        if n not in parts:
            close = difflib.get_close_matches(n, list(parts), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown benchmark part {n!r}{hint}; expected one of {', '.join(parts)}")
    return [n for n in parts if n in names]


def run_parts(parts: dict[str, Any], names: list[str], state: Any, after: Any = None) -> dict[str, float]:
    """Run ``parts[name](state)`` for each selected name, in order; ``after(name, seconds)`` follows
    each one (typically writing the record, so a long run keeps what it finished). Returns seconds
    per part."""
    seconds: dict[str, float] = {}
    for name in names:
        log("part", name)
        t0 = time.perf_counter()
        parts[name](state)
        seconds[name] = time.perf_counter() - t0
        if after is not None:
            after(name, seconds[name])
    return seconds


def merge_part_files(paths: list[str], name: str, parts: dict[str, Any] | None = None) -> BenchmarkRecord:
    """The records of parts run separately (``--merge A.json B.json``) as one, each run's command,
    commit, creation time (and, given ``parts``, which of them it ran: its ``results.seconds``) in
    ``results.provenance``; a part's "not measured" targets never hide another part's value."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    for d in docs:
        d["targets"] = [t for t in d["targets"] if t["value"] is not None or not t.get("note", "").startswith("not ")]
    rec = merge_records(docs, name)
    rec.results["provenance"] = [  # an earlier merge keeps the runs it lists
        entry for d in docs for entry in d["results"].get("provenance") or [
            {"command": d["command"], "git_commit": d["git_commit"], "created": d["created"],
             **({"parts": [k for k in parts if k in d["results"].get("seconds", {})]} if parts else {})}]]
    return rec


def run_benchmark(name: str, parts: dict[str, Any], args: Any, make_state: Any, finish: Any = None) -> int:
    """A benchmark's main after parsing ``args`` (:func:`add_part_options`): with ``--merge``, the
    given records as one (:func:`merge_part_files`); else the parts ``--parts`` selects run on
    ``make_state(rec, out)``, the record written after each (its seconds in ``results.seconds``). Then
    ``finish(rec)`` (e.g. the targets no part measured) and the final write to :func:`default_out`."""
    out = default_out(name, args.quick, args.out)
    if args.merge:
        rec = merge_part_files(args.merge, name, parts)
    else:
        rec = BenchmarkRecord(name)

        def done(part: str, seconds: float) -> None:
            rec.results.setdefault("seconds", {})[part] = round(seconds, 1)
            rec.write(out)

        run_parts(parts, selected_parts(parts, args.parts), make_state(rec, out), after=done)
    if finish is not None:
        finish(rec)
    rec.write(out)
    log(f"wrote {out}")
    return 0


def default_out(name: str, quick: bool, out: str | os.PathLike | None = None) -> Path:
    """--out if given; else benchmarks/results/<name>.json for a full run and a temporary file for
    --quick, so a smoke run never replaces a committed full-mode record."""
    import tempfile

    if out is not None:
        return Path(out)
    return Path(tempfile.gettempdir()) / f"{name}_quick.json" if quick else RESULTS_DIR / f"{name}.json"
