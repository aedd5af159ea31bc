"""The same generated C on an emulated Cortex-M3 (QEMU's mps2-an385): cross-compiled with
arm-none-eabi-gcc, sized with arm-none-eabi-size, run under qemu-system-arm; its output codes equal
the Python integer reference's."""

from __future__ import annotations

import pytest
import torch

from efficientml.engine import generate
from efficientml.engine.mcu import build_firmware, run_on_mcu
from tests.engine.conftest import needs_mcu


@needs_mcu
@pytest.mark.slow
def test_vgg_runs_bit_exact_under_qemu(zoo_integer, tmp_path):
    _, im, shape = zoo_integer("vgg")
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(3))
    gen = generate(im, x, prefix="vgg_mcu")
    res = run_on_mcu(gen, im.program.instrs[0].step.integer(x), tmp_path)
    assert res.outputs is not None and torch.equal(res.outputs, im.integer_output(x))
    weights = sum(int(op.params["w"].numel()) for op in gen.plan.graph.ops if "w" in op.params)
    assert weights < res.flash_bytes < 1024 * 1024          # int8 weights + code, within the target's 1 MB
    assert gen.plan.arena_bytes <= res.sram_bytes < 256 * 1024    # the arena is static SRAM
    d = res.to_dict()
    assert d["mcu_flash_kb"] == pytest.approx(res.flash_bytes / 1024) and d["mcu_sram_kb"] > 0
    assert (tmp_path / "vgg_mcu.c").is_file() and (tmp_path / "vgg_mcu.elf").is_file()
    print(f"mcu: flash {d['mcu_flash_kb']:.1f} KB, sram {d['mcu_sram_kb']:.1f} KB")


def test_firmware_without_the_tool_chain_says_what_to_install(zoo_integer, tmp_path, monkeypatch):
    from efficientml.core.errors import UnsupportedError
    from efficientml.engine import mcu

    _, im, shape = zoo_integer("vgg")
    gen = generate(im, torch.zeros(1, *shape))
    monkeypatch.setattr(mcu.shutil, "which", lambda name: None)
    with pytest.raises(UnsupportedError, match="arm-none-eabi-gcc.*apt-get install gcc-arm-none-eabi"):
        build_firmware(gen, torch.zeros(1, *shape, dtype=torch.int32), tmp_path)
