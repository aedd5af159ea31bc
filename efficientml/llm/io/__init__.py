"""Reading and writing LLM checkpoints: Hugging Face folders (safetensors or ``pytorch_model.bin``),
Hub ids (``hub``), GGUF files (``gguf`` read, ``gguf_write`` write, ggml block formats in
``ggml_quants``), compressed-tensors packed checkpoints (``compressed``), fused-projection names
(``fused``, ``fused_compressed``), tokenizers (``tokenizer``, SentencePiece models in
``sentencepiece_model``) and the model's own sampling defaults (``generation_config``).
Submodules are imported on use."""
