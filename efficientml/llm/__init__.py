"""LLM core: one LLaMA-family decoder (``model``), loaders for Hugging Face folders and GGUF files
(``load``), the tokenizer and chat template (``tokenizer``), perplexity (``eval``) and generation with a
KV cache (``generate``). Submodules are imported on use, so ``import efficientml.llm`` stays light.
"""
