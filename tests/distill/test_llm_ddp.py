"""LLM distillation under ``torchrun --nproc_per_node 2`` (gloo, CPU) follows the single-process loss curve
for the same global batches, with unequal trained-token counts per shard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(out, nproc):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, str(WORKER), str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


def test_two_processes_match_one(tmp_path):
    single, ddp = _run(tmp_path / "one.json", 1), _run(tmp_path / "two.json", 2)
    assert single["world"] == 1 and ddp["world"] == 2 and len(single["curve"]) == len(ddp["curve"]) == 5
    assert single["curve"][-1] < single["curve"][0]
    for key in ("curve", "kd"):
        for a, b in zip(ddp[key], single[key]):
            assert a == pytest.approx(b, abs=1e-5)
    assert ddp["norm"] == pytest.approx(single["norm"], rel=1e-5)
