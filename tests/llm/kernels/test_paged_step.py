"""The serving engine's C step (paged_step) against its eager forward on the same items and block pool:
every step's logits, for fp32 (plain and packed q|k|v, gate|up), bf16 and W4/W8 models, a sliding
window, mixed steps (decodes beside a prefill chunk whose rows attend to each other), and the one-line
refusals."""

import copy

import pytest
import torch

from efficientml.core.transform import apply
from efficientml.llm.compress import RTNConfig
from efficientml.llm.kernels import paged_step
from efficientml.llm.kernels.packed import pack_projections
from efficientml.llm.serve import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from tests.llm.conftest import tiny_model

pytestmark = pytest.mark.skipif(paged_step.status().startswith("off"), reason=paged_step.status())


def _model(kind: str, **kw):
    m = tiny_model(max_position_embeddings=256, **kw)
    if kind in ("w4", "w8"):  # packed W4/W8 linears: the engine puts them on cpu_qgemv
        apply(m, RTNConfig(int(kind[1]), 32, symmetric=kind == "w8"), inplace=True, pack=True, progress=False)
    if kind in ("packed", "bf16"):
        pack_projections(m)
    return m.to(torch.bfloat16) if kind == "bf16" else m


def _run(model, budget=12, prompts=(7, 30, 3, 21), max_tokens=6):
    """Max |native − eager| logits over every step (both on the same items and pool), the number of
    steps compared and of rows in them."""
    eng = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=8, scheduler=SchedulerConfig(
        max_num_seqs=4, max_num_batched_tokens=budget)))
    runner = eng.runner
    assert runner.native is not None, runner.native_why
    run, seen = runner.run, {"err": 0.0, "steps": 0, "rows": 0, "scale": 0.0}

    def spy(items, num_logits=None):
        native = run(items, num_logits)
        runner.native_max_rows = 0  # the eager forward on the same items (rewrites the same slots)
        eager = run(items, num_logits).float()
        runner.native_max_rows = 32
        if native.numel():  # a prefill chunk short of its prompt's end has no logits
            seen["err"] = max(seen["err"], (native - eager).abs().max().item())
            seen["scale"] = max(seen["scale"], eager.abs().max().item())
        seen["steps"] += 1
        seen["rows"] += native.shape[0]
        return native

    runner.run = spy
    g = torch.Generator().manual_seed(0)
    for n in prompts:
        eng.add_request(torch.randint(3, 128, (n,), generator=g).tolist(),
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    return seen


@pytest.mark.parametrize("kind,tol", [("fp32", 1e-4), ("packed", 1e-4), ("w8", 5e-3), ("w4", 5e-3)])
def test_native_steps_equal_eager(kind, tol):
    seen = _run(_model(kind))
    assert seen["steps"] >= 8 and seen["rows"] == 4 * 6
    assert seen["err"] <= tol, seen


def test_bf16_pool():
    """bf16 weights and pool: the eager forward rounds activations to bf16 between ops, the C step keeps
    them fp32, so the two agree to bf16's precision (not to float rounding)."""
    seen = _run(_model("bf16"))
    assert seen["err"] <= 0.02 * seen["scale"], seen


def test_sliding_window_and_long_contexts():
    """Contexts past several 32-key chunks and a window of 5 (keys before it masked)."""
    seen = _run(_model("packed", sliding_window=5), budget=24, prompts=(70, 41, 2), max_tokens=9)
    assert seen["err"] <= 1e-4, seen


def test_speculative_rows_of_one_sequence():
    """k + 1 rows of one sequence in one step (what a speculative verify sends): row i sees rows < i."""
    model = _model("packed")
    eng = LLMEngine(model, None, EngineConfig(num_blocks=16, block_size=8))
    ids = list(range(3, 40))
    table = [2, 5, 7, 1, 9]  # a block table by hand over the engine's pool: 37 tokens
    step = eng.runner.native
    prefix = step(ids[:30], list(range(30)), [table] * 30, [29])
    rows = step(ids[30:], list(range(30, 37)), [table] * 7, list(range(7)))
    with torch.inference_mode():
        ref = copy.deepcopy(model)(torch.tensor([ids]))[0].float()
    assert (prefix[0] - ref[29]).abs().max() <= 1e-4
    assert (rows - ref[30:]).abs().max() <= 1e-4


def test_refusals_and_bad_rows():
    model = _model("fp32")
    eng = LLMEngine(model, None, EngineConfig(num_blocks=4, block_size=8))
    step = eng.runner.native
    with pytest.raises(IndexError):
        step([5], [40], [[0, 1, 2, 3]], [0])  # position 40 past the table's 32 slots
    with pytest.raises(IndexError):
        step([5], [3], [[7]], [0])  # block 7 of a 4-block pool
    with pytest.raises(IndexError):
        step([500], [0], [[0]], [0])  # token past the vocabulary
    assert "pool is torch.int8" in paged_step.why_not(model, torch.zeros(1, dtype=torch.int8))
    off = LLMEngine(_model("fp32"), None, EngineConfig(num_blocks=4, cpu_kernels=False))
    assert off.runner.native is None and "cpu_kernels=False" in off.runner.native_why
