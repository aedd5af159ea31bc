"""``efficientml finetune MODEL --method lora|qlora|dora|full|bitfit|adapter|prompt|prefix|ia3 --data FILE.jsonl |
--dataset NAME --out DIR``: fine-tune an LLM; LoRA/QLoRA/DoRA save the adapter in PEFT's layout, full
fine-tuning a Hugging Face folder, the other methods their config + trainable tensors. A CNN of the zoo
(``resnet20 --method tinytl|bitfit|last-layer|full --dataset fashion-mnist``) goes to
:mod:`efficientml.cli.finetune_cnn`."""

from __future__ import annotations

import argparse

from efficientml.cli.common import add_json_flag, console, fraction, number, positive_int, print_json
from efficientml.cli.finetune_args import CNN_ONLY, LLM_METHODS, add_method_args, is_cnn, peft_config, split_targets
from efficientml.core.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune an LLM (LoRA, QLoRA, DoRA, BitFit, adapters, prompt/prefix, "
                                        "IA3, fully) or transfer a zoo CNN (TinyTL, BitFit, last layer, fully)",
                       description="Supervised fine-tuning of an LLM (built-in name, GGUF file or HF folder) on "
                                   "a .jsonl file (messages / prompt+response / text per line; loss on the "
                                   "response) or a text corpus (first 90%%). LoRA/QLoRA/DoRA write "
                                   "adapter_config.json + adapter_model.safetensors (PEFT's layout) into --out; "
                                   "bitfit/adapter/prompt/prefix/ia3 write method_config.json + "
                                   "trainable.safetensors. A zoo CNN (e.g. resnet20) transfers to --dataset "
                                   "fashion-mnist with its training memory measured.")
    p.add_argument("model", help="e.g. smollm2-135m, a .gguf file, a Hugging Face folder, or a zoo CNN (resnet20)")
    p.add_argument("--method", default="lora", choices=LLM_METHODS + CNN_ONLY,
                   help="LLM: lora, qlora, w4lora, dora, full, bitfit, adapter, prompt, prefix, ia3 (w4lora: LoRA on "
                        "a W4 base, int4 groups of 32, merged back onto its grid by --merge-into); "
                        "CNN (zoo model): tinytl, bitfit, last-layer, full")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a .jsonl file of examples")
    src.add_argument("--dataset", help="a text corpus name (tinyshakespeare, wikitext2-raw-test, …)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--rank", type=positive_int, default=16)
    p.add_argument("--alpha", type=number("a positive number", 0, low_open=True), default=32.0)
    p.add_argument("--dropout", type=fraction, default=0.0)
    p.add_argument("--targets", default=None, help="comma-separated layer names or globs to adapt (default: the "
                   "method's: every block projection for LoRA, k_proj,v_proj,down_proj for IA3)")
    p.add_argument("--dora", action="store_true", help="DoRA: magnitude + direction")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (LLM default 100; CNN: "
                   "at most this many, default --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--grad-accum", type=positive_int, default=1)
    p.add_argument("--max-length", type=positive_int, default=256, help="tokens per row")
    p.add_argument("--lr", type=number("a positive learning rate", 0, low_open=True), default=None,
                   help="peak learning rate (default 2e-4 for LLMs, 1e-3 for CNNs)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--no-packing", action="store_true", help="one example per row, padded")
    p.add_argument("--max-chars", type=positive_int, default=None, help="read only this many characters of --dataset")
    p.add_argument("--eval-rows", type=number("a non-negative integer", 0, integer=True), default=8, help="held-out rows to evaluate (--dataset; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    add_method_args(p)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge-into", choices=["w4"], default=None,
                   help="after LoRA/QLoRA training, merge the adapter into a 4-bit model re-quantized with "
                        "calibration (and naively, for comparison); saves OUT/merged-w4 (packed) and "
                        "OUT/merged-w4.gguf (Q4_0)")
    p.add_argument("--merge-method", choices=["gptq", "awq", "awq_gptq"], default="gptq",
                   help="calibrated re-quantization (awq_gptq: AWQ scales, then GPTQ rounding)")
    p.add_argument("--calib-samples", type=positive_int, default=32, help="calibration rows for --merge-into")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from efficientml.core.outputs import check_output
    from efficientml.finetune import LoRAConfig
    from efficientml.finetune.recipe import held_out_loss, prepare
    from efficientml.finetune.sft import SFTConfig, train_sft
    from efficientml.finetune.sft_data import batches
    from efficientml.llm.io.load import load
    from efficientml.train.distributed import init_distributed

    if is_cnn(args.model):
        from efficientml.cli.finetune_cnn import run_cnn

        return run_cnn(args)
    if args.method in CNN_ONLY:
        raise ConfigError(f"--method {args.method} is for CNNs of the zoo (e.g. resnet20); for the LLM "
                          f"{args.model!r} use one of {', '.join(LLM_METHODS)}")
    targets = split_targets(args.targets)
    out = check_output(args.out, args.overwrite, folder=True)  # before any work: exists, writable, ours
    if args.merge_into and args.method == "full":
        raise ConfigError("--merge-into merges a LoRA/QLoRA adapter; full fine-tuning has none "
                          "(quantize the saved model with `efficientml llm quantize` instead)")
    ctx = init_distributed()  # under torchrun: DDP on gloo (CPU); rank 0 saves and reports
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SFTConfig(lr=args.lr or 2e-4, steps=args.steps or 100, batch_size=args.batch_size, grad_accum=args.grad_accum,
                    optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing, seed=args.seed)
    lora = LoRAConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora, dora=args.dora,
                      target_modules=targets or LoRAConfig().target_modules, seed=args.seed)
    config = peft_config(args, targets)
    model, tok = load(args.model)
    if args.merge_into:  # fail before training if the merged model could not be written as GGUF
        from efficientml.finetune.merge_quant import check_gguf_writable

        check_gguf_writable(model, tok)
    ids, labels, held = _rows(args, tok)
    model = prepare(model, args.method, lora if args.method != "full" else None, config)
    before = held_out_loss(model, held) if held is not None else None
    quiet = args.json or args.no_progress
    hist = train_sft(model, batches(ids, labels, min(args.batch_size, ids.shape[0]), seed=args.seed), cfg,
                     progress=not quiet, dist=ctx)
    try:  # the other ranks only train; rank 0 evaluates, saves and reports
        if ctx is None or ctx.main:
            _report(args, model, tok, out, cfg, lora, config, ids, hist, before, held)
        return 0
    finally:
        if ctx is not None:
            ctx.close()


def _report(args, model, tok, out, cfg, lora, config, ids, hist, before, held) -> None:
    """Rank 0 (or the only process) after training: held-out loss, the saved result, optional merge, the report."""
    from efficientml.core.serialization import write_json
    from efficientml.finetune import trainable_parameters
    from efficientml.finetune.recipe import held_out_loss, save_result

    after = held_out_loss(model, held) if held is not None else None
    save_result(model, tok, out, args.method, lora, str(args.model), overwrite=args.overwrite, config=config)
    merged = _merge(model, tok, out, args, held) if args.merge_into else None
    report = {"model": str(args.model), "method": args.method, "out": str(out), "rows": int(ids.shape[0]),
              "sft": cfg.to_dict(),
              "lora": lora.to_dict() if args.method in ("lora", "qlora", "w4lora", "dora") else None,
              "config": config.to_dict() if config is not None else None,
              "trainable": trainable_parameters(model), "train": hist, "eval_before": before, "eval_after": after,
              "merged": merged}
    write_json(out / "training_log.json", report)
    if args.json:
        print_json(report)
        return
    _print(report, args)


def _rows(args: argparse.Namespace, tok):
    """(ids, labels, held-out rows or None) from --data (a .jsonl file) or --dataset (a corpus, last 10% held out)."""
    from efficientml.finetune.recipe import corpus_rows, jsonl_rows

    if args.data:
        return (*jsonl_rows(tok, args.data, args.max_length, packing=not args.no_packing), None)
    (ids, labels), held = corpus_rows(tok, args.dataset, args.max_length, max_chars=args.max_chars)
    return ids, labels, held[:args.eval_rows] if args.eval_rows > 0 else None


def _print(report: dict, args: argparse.Namespace) -> None:
    c, t, hist = console(), report["trainable"], report["train"]
    before, after, merged = report["eval_before"], report["eval_after"], report["merged"]
    c.print(f"{args.method}: {t['trainable']:,} of {t['total']:,} parameters trained ({100 * t['fraction']:.2f}%), "
            f"{hist['steps']} steps, {hist['tokens_per_s']:.0f} tokens/s")
    c.print(f"loss {hist['curve'][0]['loss']:.3f} → {hist['curve'][-1]['loss']:.3f}")
    if after is not None:
        c.print(f"held-out perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f}")
    if merged is not None:
        c.print(f"merged into W4 ({merged['method']}): {merged['paths']['packed']}, {merged['paths']['gguf']}")
    c.print(f"saved to {report['out']}")


def _merge(model, tok, out, args, held) -> dict:
    """--merge-into w4: calibrated and naive merges, held-out perplexity of each beside base+adapter."""
    from efficientml.finetune.merge_quant import MergeQuantConfig, merge_into_quantized, save_merged
    from efficientml.finetune.recipe import held_out_loss
    from efficientml.llm.compress import CalibConfig, calibration_tokens

    source = args.dataset or "wikitext2-valid"
    calib = calibration_tokens(tok, CalibConfig(source=source, n_samples=args.calib_samples,
                                                seq_len=min(args.max_length, 512)))
    if args.method == "w4lora":  # the base's own grid: GPTQ with its scales fixed
        from efficientml.finetune.w4base import merge_on_base_grid

        res = merge_on_base_grid(model, calib)
    else:
        res = merge_into_quantized(model, calib, MergeQuantConfig(method=args.merge_method), progress=False)
    paths = save_merged(res.calibrated, tok, out / "merged-w4", overwrite=args.overwrite)
    ppl = None
    if held is not None:
        ppl = {k: held_out_loss(m, held)["perplexity"] for k, m in
               (("adapter", model), ("calibrated", res.calibrated), ("naive", res.naive))}
    return {"method": "gptq_on_base_grid" if args.method == "w4lora" else args.merge_method, "paths": paths,
            "perplexity": ppl, "calib_source": source,
            "report": res.report}
