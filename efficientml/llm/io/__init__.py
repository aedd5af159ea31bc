"""Reading and writing LLM checkpoints: where a model comes from (``source``: built-in names, paths,
Hub ids via ``hub``), Hugging Face folders (``folder``: weight files and config; ``load``: load and
save, safetensors or ``pytorch_model.bin``), GGUF files (``gguf`` read, ``gguf_write`` write with
``gguf_tokenizer`` for the tokenizer metadata, ggml block formats decoded in ``ggml_quants`` and encoded
in ``ggml_encode``), compressed-tensors packed checkpoints (``compressed``), fused-projection names
(``fused``, ``fused_compressed``), tokenizers (``tokenizer``, SentencePiece models in
``sentencepiece_model``) and the model's own sampling defaults (``generation_config``). What differs
between model families is read from :mod:`efficientml.llm.arch`.

Imports point one way: ``source`` and ``folder`` sit below ``hub``, ``generation_config`` and ``load``;
``compressed`` never imports ``load``. Submodules are imported on use."""
