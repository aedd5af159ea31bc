"""Benchmark records in the schema of BENCHMARKS.md: machine, command, commit, results, targets.

    rec = BenchmarkRecord("pruning")
    rec.results["vgg"] = {...}
    rec.target("finegrained_size_ratio", 0.233, "<=", 0.25, note="nonzero / dense fp32 weights")
    rec.write()          # benchmarks/results/pruning.json (atomically)
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_OPS = {"<=": lambda v, t: v <= t, ">=": lambda v, t: v >= t, "==": lambda v, t: v == t,
        "<": lambda v, t: v < t, ">": lambda v, t: v > t}

REPO_ROOT = Path(__file__).resolve().parents[2]


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
        if op not in _OPS:
            raise ValueError(f"op must be one of {list(_OPS)}, got {op!r}")
        met = bool(value is not None and _OPS[op](value, threshold))
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

        p = Path(path) if path is not None else REPO_ROOT / "benchmarks" / "results" / f"{self.name}.json"
        write_json(p, self.to_dict())
        return p
