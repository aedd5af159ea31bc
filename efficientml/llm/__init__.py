"""LLM core: one LLaMA-family decoder (``model``), loaders for Hugging Face folders, GGUF files and Hub
ids (``load``, ``hub``; Phi-3's fused projections in ``fused``), the tokenizer and chat template
(``tokenizer``, SentencePiece models in ``sentencepiece_model``), perplexity (``eval``), generation with
a KV cache (``generate``) and the model's own sampling defaults (``generation_config``). Submodules are
imported on use, so ``import efficientml.llm`` stays light.
"""
