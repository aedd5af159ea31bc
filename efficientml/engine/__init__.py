"""TinyEngine-style int8 CNN runtime (issue #22): the integer-only model from
:mod:`efficientml.quant.integer` lowered to kernel calls on flat uint8 buffers (:mod:`.lower`), its
activations planned into one arena (:mod:`.planner`), generated as self-contained C (:mod:`.codegen`),
compiled and run on this machine (:mod:`.host`) or cross-compiled for a Cortex-M and run under QEMU
(:mod:`.mcu`). The C is bit-exact with the Python integer reference.

>>> eng = compile_engine(integer_model, example_input)       # doctest: +SKIP
>>> torch.equal(eng.run(x), integer_model.integer_output(x))   # doctest: +SKIP
True

Patch-based inference (MCUNetV2) is :mod:`.patch`; sparse execution (EIE sparse × sparse FC layers,
submanifold and regular sparse 3D convolution) is :mod:`.sparse`. The command line is
``efficientml engine build|run|mcu`` (:mod:`efficientml.cli.engine`).
"""

from efficientml.engine.errors import EngineBuildError, EngineUnsupportedError
from efficientml.engine.host import EngineModel, GeneratedModel, compile_engine, generate
from efficientml.engine.lower import Graph, Op, View, lower
from efficientml.engine.mcu import McuResult, build_firmware, run_on_mcu
from efficientml.engine.planner import MemoryPlan, compare_with_analysis, plan_memory
from efficientml.engine.patch import PatchPlan, compile_patched, plan_patches

__all__ = ["EngineBuildError", "EngineUnsupportedError", "EngineModel", "GeneratedModel", "compile_engine",
           "generate", "Graph", "Op", "View", "lower", "McuResult", "build_firmware", "run_on_mcu", "MemoryPlan",
           "compare_with_analysis", "plan_memory", "PatchPlan", "compile_patched", "plan_patches"]
