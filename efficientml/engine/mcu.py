"""The same generated C on a microcontroller: cross-compiled for a Cortex-M3 with Debian's
``gcc-arm-none-eabi`` (+ ``libnewlib-arm-none-eabi`` for ``memcpy``), sized with
``arm-none-eabi-size`` and run under ``qemu-system-arm -M mps2-an385``.

The firmware is the model's ``.c`` unchanged, a generated ``main.c`` holding the input codes as a
const array, and ``csrc/cm3_startup.c`` + ``csrc/mps2_an385.ld`` (vector table, memory map). The
output codes come back as hex over ARM semihosting. Flash is ``text + data`` and SRAM ``data + bss``
of the model's own object file (weights, code and arena; the firmware's stack and startup excluded).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from efficientml.core.errors import UnsupportedError
from efficientml.engine.codegen import check_prefix
from efficientml.engine.errors import EngineBuildError
from efficientml.engine.host import GeneratedModel

CSRC = Path(__file__).with_name("csrc")
ARM_CC, ARM_SIZE, QEMU = "arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm"
ARM_FLAGS = ("-mcpu=cortex-m3", "-mthumb", "-O2", "-std=c99", "-ffunction-sections", "-fdata-sections")
LINK_FLAGS = ("-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs", "-Wl,--gc-sections")


def missing_tools() -> list[str]:
    """The cross-compiler, size tool and emulator that are not installed (empty: all there)."""
    return [t for t in (ARM_CC, ARM_SIZE, QEMU) if shutil.which(t) is None]


@dataclass
class McuResult:
    """A firmware build: Flash/SRAM of the model's object, and (after a run) the output codes."""

    flash_bytes: int
    sram_bytes: int
    elf: Path
    outputs: torch.Tensor | None = None     # uint8 codes as int32, the model's output shape

    def to_dict(self) -> dict[str, float]:
        return {"mcu_flash_kb": self.flash_bytes / 1024, "mcu_sram_kb": self.sram_bytes / 1024}


def _main_c(gen: GeneratedModel, codes: torch.Tensor) -> str:
    p, up = check_prefix(gen.prefix), gen.prefix.upper()
    vals = ", ".join(str(int(v)) for v in codes.reshape(-1).tolist())
    return "\n".join([
        f'#include "{p}.h"', "void eml_print(const char *s);",
        f"static const uint8_t input[{up}_INPUT_SIZE] = {{{vals}}};",
        f"static uint8_t output[{up}_OUTPUT_SIZE];",
        f"static char text[2 * {up}_OUTPUT_SIZE + 2];",
        "int main(void) {",
        f"    int rc = {p}_run(input, output);",
        '    const char *hex = "0123456789abcdef";',
        f"    for (int i = 0; i < {up}_OUTPUT_SIZE; i++) {{",
        "        text[2 * i] = hex[output[i] >> 4]; text[2 * i + 1] = hex[output[i] & 15];", "    }",
        f"    text[2 * {up}_OUTPUT_SIZE] = '\\n'; text[2 * {up}_OUTPUT_SIZE + 1] = 0;",
        "    eml_print(text);", "    return rc;", "}", ""])


def _run(cmd: list[str], what: str, timeout: float = 300, both: bool = False) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineBuildError(f"{what} did not finish within {timeout:.0f} s") from None
    if r.returncode != 0:
        last = ((r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise EngineBuildError(f"{what} failed: {last}")
    return r.stdout + r.stderr if both else r.stdout


def _sizes(obj: Path) -> tuple[int, int]:
    """(Flash, SRAM) bytes of an object: text + data, data + bss (``arm-none-eabi-size`` Berkeley)."""
    line = _run([ARM_SIZE, str(obj)], "arm-none-eabi-size").strip().splitlines()[-1].split()
    text, data, bss = (int(v) for v in line[:3])
    return text + data, data + bss


def require_tools() -> None:
    """Raise one sentence naming the missing tools and the Debian packages that bring them."""
    if missing_tools():
        raise UnsupportedError(f"the Cortex-M build needs {', '.join(missing_tools())} (Debian: apt-get install "
                               "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm)")


def build_firmware(gen: GeneratedModel, codes: torch.Tensor, folder: str | Path) -> McuResult:
    """Cross-compile ``gen`` with one input's codes (``input_shape``) into ``folder/<prefix>.elf``."""
    require_tools()
    out = Path(folder)
    c_path, _ = gen.write(out)
    (out / "main.c").write_text(_main_c(gen, codes))
    obj = out / f"{gen.prefix}.o"
    _run([ARM_CC, *ARM_FLAGS, "-c", str(c_path), "-o", str(obj)], f"cross-compiling {c_path.name}")
    flash, sram = _sizes(obj)
    elf = out / f"{gen.prefix}.elf"
    _run([ARM_CC, *ARM_FLAGS, *LINK_FLAGS, "-T", str(CSRC / "mps2_an385.ld"), f"-I{out}",
          str(CSRC / "cm3_startup.c"), str(out / "main.c"), str(obj), "-o", str(elf)], "linking the firmware")
    return McuResult(flash, sram, elf)


def run_qemu(elf: Path, timeout: float = 120) -> str:
    """Run a firmware under ``qemu-system-arm -M mps2-an385``; its semihosting output (QEMU writes
    ``SYS_WRITE0`` text to its stderr in some versions, stdout in others: both are read)."""
    return _run([QEMU, "-M", "mps2-an385", "-nographic", "-monitor", "none", "-serial", "none",
                 "-semihosting-config", "enable=on,target=native", "-kernel", str(elf)], "qemu", timeout, both=True)


def run_on_mcu(gen: GeneratedModel, codes: torch.Tensor, folder: str | Path | None = None) -> McuResult:
    """Build and run one input's codes (1, …) on the emulated Cortex-M3; ``outputs`` are its codes."""
    with tempfile.TemporaryDirectory(prefix="eml-mcu-") as tmp:
        res = build_firmware(gen, codes, folder or tmp)
        text = run_qemu(res.elf).strip().splitlines()
        g = gen.plan.graph
        if not text or len(text[-1]) != 2 * g.output.numel:
            raise EngineBuildError(f"the firmware printed {text[-1:]!r}, not {g.output.numel} output codes")
        raw = bytes.fromhex(text[-1])
        res.outputs = torch.tensor(list(raw), dtype=torch.int32).view(g.output.shape)
        if folder is None:
            res.elf = Path(folder or tmp) / res.elf.name     # removed with the folder; kept for the record
        return res
