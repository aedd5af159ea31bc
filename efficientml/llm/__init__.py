"""LLM core, split by concern:

- ``config``, ``model``: the model configuration and one LLaMA-family decoder (no kernel dispatch);
- ``io/``: HF folders, Hub ids, GGUF read/write, compressed checkpoints, tokenizers, sampling defaults;
- ``kernels/``: CPU and GPU matrix-vector and quantized kernels, swapped in as modules;
- ``kv_cache``, ``generate``, ``chat``, ``eval``: caches, generation, chat sessions, perplexity;
- ``compress/``: calibration and RTN/AWQ/GPTQ/SmoothQuant/Wanda/SparseGPT/KV-cache quantization.

Submodules are imported on use, so ``import efficientml.llm`` stays light.
"""
