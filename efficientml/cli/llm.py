"""``efficientml llm {info,ppl,generate,chat,convert} MODEL …`` — MODEL is a built-in name
(``smollm2-135m``), a GGUF file, a Hugging Face folder or a Hugging Face Hub id (``owner/name``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from efficientml.cli.common import add_json_flag, add_overwrite_flag, device, number, positive_int, print_json
from efficientml.core.errors import ConfigError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llm", help="LLaMA-family models: perplexity, generation, chat, conversion",
                       description="Load a LLaMA-family model (built-in name, GGUF file or Hugging Face "
                                   "folder) and evaluate, run or convert it.")
    s = p.add_subparsers(dest="llm_command", metavar="ACTION")
    p.set_defaults(func=_no_action)

    for add in (_add_info, _add_ppl, _add_generate, _add_chat, _add_convert):
        add(s)
    from efficientml.cli import llm_compress  # `llm quantize` / `llm prune` (efficientml.llm.compress)
    llm_compress.register(s)
    from efficientml.cli import llm_serve  # `llm serve` (efficientml.llm.serve.openai_api)
    llm_serve.register(s, _model_args, _load_for_serving)


def _no_action(args: argparse.Namespace) -> int:
    """`efficientml llm` alone: a usage error (exit 2), as for any missing argument."""
    raise ConfigError("choose an action: info, ppl, generate, chat, convert, quantize, prune or serve "
                      "(see 'efficientml llm --help')")


def _model_args(q: argparse.ArgumentParser) -> None:
    """The model and where it runs: every `llm` action takes these."""
    q.add_argument("model", help="smollm2-135m, a .gguf file, a Hugging Face model folder, or a Hub id "
                        "(owner/name[@revision], owner/name/file.gguf)")
    q.add_argument("--dtype", choices=sorted(DTYPES) + ["auto"], default="float32",
                   help="float32 (default), bfloat16, float16, or auto: the checkpoint's own (config.json "
                        "torch_dtype; a GGUF's float type, float32 for quantized weights). On CPU every "
                        "dtype decodes on a C kernel (fp32, bf16/fp16, and 4/8-bit weights whatever the "
                        "dtype); a combination without one says so in one line")
    q.add_argument("--device", type=device, default="cpu", help="cpu, cuda, or auto")
    q.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch)")


def _sampling_args(q: argparse.ArgumentParser, max_new: int) -> None:
    """Sampling options of `llm generate` and `llm chat`."""
    q.add_argument("--max-new-tokens", type=positive_int, default=max_new)
    q.add_argument("--temperature", type=number("a temperature ≥ 0", 0, 1e4), default=None,
                   help="0 = greedy (the default, unless the model's generation config samples)")
    q.add_argument("--top-k", type=positive_int, default=None)
    q.add_argument("--top-p", type=number("a top-p in (0, 1]", 0, 1, low_open=True), default=None)
    q.add_argument("--min-p", type=number("a min-p in [0, 1]", 0, 1), default=None,
                   help="drop tokens below min_p × the top probability")
    q.add_argument("--repetition-penalty", type=number("a repetition penalty > 0", 0, 1e4, low_open=True),
                   default=None,
                   help="> 1 discourages tokens already in the prompt or output (default 1 = off)")
    q.add_argument("--generation-config", choices=["auto", "none"], default="auto",
                   help="auto (default): settings not given here come from the model's generation_config.json "
                        "or GGUF sampling metadata, as in transformers and vLLM; none: greedy unless set here")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer where this text appears (not shown); repeatable")


def _add_info(s: argparse._SubParsersAction) -> None:
    """`llm info`: configuration, parameter count, tokenizer."""
    q = s.add_parser("info", help="configuration, parameter count, tokenizer")
    _model_args(q)
    add_json_flag(q)
    q.set_defaults(func=run_info)


def _add_ppl(s: argparse._SubParsersAction) -> None:
    """`llm ppl`: perplexity on a corpus or a text file."""
    q = s.add_parser("ppl", help="perplexity on a corpus or a text file",
                     description="Perplexity with the protocol of efficientml.llm.eval: the text is "
                                 "tokenized whole, cut into windows of --context tokens every --stride "
                                 "tokens; each token with context in its window is scored once.")
    _model_args(q)
    src = q.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="wikitext2-raw-test",
                     help="wikitext2-raw-test (default), tinyshakespeare, …")
    src.add_argument("--text-file", default=None, help="any UTF-8 text file")
    q.add_argument("--context", type=positive_int, default=1024)
    q.add_argument("--stride", type=positive_int, default=None, help="default: = context (no overlap)")
    q.add_argument("--bos", action="store_true", help="put BOS at the start of every window")
    q.add_argument("--batch-size", type=positive_int, default=1)
    q.add_argument("--max-windows", type=positive_int, default=None, help="evaluate only the first N windows")
    q.add_argument("--kv-policy", default=None, metavar="SPEC",
                   help="read the text as one stream, --context tokens per forward, through a KV-cache policy: "
                        "full, window:N, streaming:SINKS,WINDOW (StreamingLLM), h2o:HEAVY,RECENT[,mean]")
    q.add_argument("--max-tokens", type=positive_int, default=None, help="with --kv-policy: the first N tokens")
    add_json_flag(q)
    q.set_defaults(func=run_ppl)


def _add_generate(s: argparse._SubParsersAction) -> None:
    """`llm generate`: complete prompts."""
    q = s.add_parser("generate", help="complete a prompt (streamed)")
    _model_args(q)
    q.add_argument("prompt", nargs="+", help="the prompt text; several prompts run as one left-padded batch")
    q.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    q.add_argument("--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='extra chat-template variables, e.g. \'{"enable_thinking": false}\' (Qwen3)')
    q.add_argument("--logprobs", action="store_true",
                   help="with --json: each new token's id, text and log-probability under the model")
    _sampling_args(q, 128)
    add_json_flag(q)
    q.set_defaults(func=run_generate)


def _add_chat(s: argparse._SubParsersAction) -> None:
    """`llm chat`: multi-turn chat."""
    q = s.add_parser("chat", help="multi-turn chat in the terminal (reads stdin when piped)")
    _model_args(q)
    q.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    q.add_argument("--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='extra chat-template variables, e.g. \'{"enable_thinking": false}\' (Qwen3)')
    q.add_argument("--max-context", type=positive_int, default=2048)
    _sampling_args(q, 256)
    q.set_defaults(func=run_chat)


def _add_convert(s: argparse._SubParsersAction) -> None:
    """`llm convert`: write a Hugging Face folder or a GGUF file."""
    q = s.add_parser("convert", help="save as a Hugging Face folder (config.json, safetensors, tokenizer) "
                                      "or as a GGUF file for llama.cpp")
    _model_args(q)
    q.add_argument("output", help="output folder, or a .gguf file (written atomically)")
    q.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"], default="f16",
                   help="GGUF: the matrices' type (norms stay f32; embeddings q8_0 under q4_*); default f16")
    add_overwrite_flag(q, "the output (a folder only if it holds nothing but files efficientml writes)")
    q.set_defaults(func=run_convert)


def _load(args: argparse.Namespace, for_decode: bool = False):
    """(model, tokenizer, source): the source resolved (a Hub id fetched, a GGUF header parsed) once, for
    the dtype, the weights and the sampling defaults alike. ``for_decode``: a GGUF file's quantized
    linears stay as stored, on the quantized CPU kernel (generate, chat)."""
    import torch

    from efficientml.core.device import resolve_device
    from efficientml.llm.io import load as L
    from efficientml.llm.io.source import open_source

    if args.threads:
        torch.set_num_threads(args.threads)
    src = open_source(args.model)
    dtype = L.checkpoint_dtype(src) if args.dtype == "auto" else getattr(torch, DTYPES[args.dtype])
    from efficientml.cli.model_source import warn_not_finite

    model, tok = L.load(src, dtype=dtype, device=resolve_device(args.device), keep_quantized=for_decode)
    warn_not_finite(model, "the model")
    return model, tok, src


def _json_object(text: str) -> dict:
    """An argparse type: a JSON object (chat-template variables)."""
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"enable_thinking\": false}}', "
                                         f"got {text!r}")
    taken = [k for k in ("messages", "add_generation_prompt", "bos_token", "eos_token") if k in v]
    if taken:
        raise argparse.ArgumentTypeError(f"{taken[0]!r} is set by efficientml (the conversation, generation "
                                         "prompt and special tokens); give only the template's own variables")
    return v


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _sampling(args: argparse.Namespace, src, stops: tuple[int, ...] = ()):
    """The flags given, over the model's own defaults (``--generation-config auto``) read from ``src``
    (:func:`_load`'s opened source), over greedy."""
    from efficientml.llm.generate import SamplingConfig
    from efficientml.llm.io.generation_config import generation_defaults

    given = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    model = generation_defaults(src) if args.generation_config == "auto" else {}
    taken = {k: v for k, v in model.items() if k not in given}
    if taken:
        print("sampling from the model's generation config: " + ", ".join(f"{k}={v}" for k, v in taken.items())
              + " (--generation-config none: greedy)", file=sys.stderr)
    return SamplingConfig(args.max_new_tokens, stop_token_ids=stops, seed=args.seed, stop_strings=tuple(args.stop),
                          **{**taken, **given})


def _storage(src) -> str:
    """How the weights are stored: a GGUF's tensor formats with counts, or a folder's file bytes."""
    from collections import Counter

    if isinstance(src, Path):
        from efficientml.llm.io.folder import weight_files

        kind, files = weight_files(src)
        return f"{len(files)} {kind} file(s), {sum(f.stat().st_size for f in files) / 1e6:.1f} MB"
    kinds = Counter(t.kind for t in src.infos)
    return ", ".join(f"{k} ×{n}" for k, n in kinds.most_common()) + f" (GGUF, {src.path.stat().st_size / 1e6:.1f} MB)"


def run_info(args: argparse.Namespace) -> int:
    from efficientml.llm.io.generation_config import generation_defaults
    from efficientml.llm.io.load import load_config, load_tokenizer
    from efficientml.llm.io.source import open_source

    src = open_source(args.model)  # a GGUF file's header is parsed once for all three
    cfg, tok = load_config(src), load_tokenizer(src)
    info = {"source": str(src if isinstance(src, Path) else src.path), "model_type": cfg.model_type,
            "parameters": cfg.num_parameters(), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.dim_per_head,
            "ffn": cfg.intermediate_size, "vocab": cfg.vocab_size, "context": cfg.max_position_embeddings,
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "tied_embeddings": cfg.tie_word_embeddings,
            "bos": tok.bos_token, "eos": tok.eos_token, "stop_ids": cfg.eos_token_ids,
            "chat_template": bool(tok.chat_template), "sampling_defaults": generation_defaults(src),
            "storage": _storage(src)}
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:16s} {v}")
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from efficientml.data.text import load_text
    from efficientml.llm.eval import PerplexityProtocol, text_perplexity

    text = load_text(args.text_file or args.dataset)
    if args.kv_policy is not None:
        return _stream_ppl(args, text)
    proto = PerplexityProtocol(args.context, args.stride, args.bos)
    model, tok, _ = _load(args)
    r = text_perplexity(model, tok, text, proto, batch_size=args.batch_size, max_windows=args.max_windows)
    if args.json:
        print_json({"model": args.model, "text": args.text_file or args.dataset, **r.to_dict()})
    else:
        print(f"perplexity {r.perplexity:.4f}  ({r.tokens_scored} tokens scored in {r.windows} windows of "
              f"{proto.context}, stride {proto.step}; {r.seconds:.1f} s, {r.tokens_per_s:.0f} tok/s)")
    return 0


def _stream_ppl(args: argparse.Namespace, text: str) -> int:
    from efficientml.llm.serve.kv_policy import KVPolicy
    from efficientml.llm.serve.policy_cache import stream_perplexity

    policy = KVPolicy.parse(args.kv_policy)  # a bad spec fails before the model loads
    model, tok, _ = _load(args)
    ids = tok.encode(text, add_bos=args.bos)[:args.max_tokens]
    r = stream_perplexity(model, ids, policy, chunk=args.context)
    if args.json:
        print_json({"model": args.model, "text": args.text_file or args.dataset, **r})
    else:
        print(f"perplexity {r['perplexity']:.4f}  ({r['tokens_scored']} tokens as one stream, {args.kv_policy}; "
              f"KV held {r['kv_bytes_end'] / 2**20:.1f} MiB, peak {r['kv_bytes_peak'] / 2**20:.1f} MiB)")
    return 0


def _for_decode(model):
    """CPU generation streams the weights once per token: run them on the matrix-vector kernels (or
    re-lay them for MKL's where they cannot be built); say in one line what has no fast path."""
    from efficientml.llm.kernels.decode import prepare_cpu_decode, slow_linears

    if model.device.type == "cpu":
        prepare_cpu_decode(model)
        slow = slow_linears(model)
        if slow:
            name, why = next(iter(slow.items()))
            print(f"warning: {len(slow)} quantized linear(s) have no fast CPU kernel and dequantize their "
                  f"weight on every call, ~20x slower (e.g. {name}: {why})", file=sys.stderr)
    return model


def _load_for_serving(args: argparse.Namespace):
    """(model, tokenizer) as `llm generate` runs them (`llm serve`)."""
    model, tok, _ = _load(args, for_decode=True)
    return _for_decode(model), tok


def run_generate(args: argparse.Namespace) -> int:
    from efficientml.llm.generate import generate

    if args.chat_template_kwargs and not args.chat:  # before the model loads
        raise ConfigError("--chat-template-kwargs applies with --chat")
    model, tok, src = _load(args, for_decode=True)
    model = _for_decode(model)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], **args.chat_template_kwargs)
             if args.chat else p for p in args.prompt]
    rows = [tok.encode(t) for t in texts]
    stops = tuple(t for t in {tok.eos_id, *model.config.eos_token_ids} if t is not None)
    live = len(rows) == 1 and not args.json  # one prompt streams to the terminal; a batch prints at the end

    def on_text(_: int, piece: str) -> None:
        if live:
            sys.stdout.write(piece)
            sys.stdout.flush()

    res = generate(model, rows if len(rows) > 1 else rows[0], _sampling(args, src, stops), tokenizer=tok,
                   on_text=on_text, return_logprobs=args.logprobs)
    done = [{"prompt": p, "completion": text, "prompt_tokens": n, "new_tokens": len(r)}
            for p, text, r, n in zip(args.prompt, res.texts, res.tokens, res.prompt_lengths)]
    if res.logprobs is not None:
        for d, r, lps in zip(done, res.tokens, res.logprobs):
            d["tokens"] = [{"id": t, "text": tok.decode([t]), "logprob": lp} for t, lp in zip(r, lps)]
    if args.json:
        speed = {"ttft_s": res.ttft_s, "decode_tok_s": res.decode_tok_s}
        print_json({**done[0], **speed} if len(done) == 1 else {"results": done, "batch": len(done), **speed})
        return 0
    if not live:
        for i, d in enumerate(done):
            print(f"[{i}] {d['prompt']}{d['completion']}")
    else:
        print()
    sys.stdout.flush()
    print(f"[{sum(res.prompt_lengths)} prompt tokens, TTFT {res.ttft_s:.2f} s, {res.new_tokens} tokens"
          f"{f' × {len(done)} rows' if len(done) > 1 else ''}, {res.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from efficientml.llm.chat import ChatSession

    if sys.stdin is None or sys.stdin.closed:  # `efficientml llm chat … <&-`
        raise ConfigError("llm chat reads its messages from stdin, which is closed; run it in a terminal or "
                          "pipe text into it")
    model, tok, src = _load(args, for_decode=True)
    model = _for_decode(model)
    chat = ChatSession(model, tok, system=args.system, sampling=_sampling(args, src), max_context=args.max_context,
                       template_kwargs=args.chat_template_kwargs)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset clears the conversation, /quit or Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = _read_line()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            chat.reset()
            continue

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        reply = chat.send(line, on_text=show)
        r = reply.result
        print()
        print(f"[TTFT {r.ttft_s:.2f} s ({reply.prefilled_tokens} prompt tokens) · {r.new_tokens} tokens · "
              f"{r.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


def _read_line() -> str:
    """One line of stdin; '' at its end (or when it was closed meanwhile)."""
    try:
        return sys.stdin.readline()
    except UnicodeDecodeError as e:
        raise ConfigError(f"the text read from stdin is not UTF-8 (byte 0x{e.object[e.start]:02x}); convert it "
                          "to UTF-8") from None
    except (OSError, ValueError):
        return ""


def run_convert(args: argparse.Namespace) -> int:
    from efficientml.llm.io.generation_config import generation_defaults
    from efficientml.llm.io.load import save_hf

    from efficientml.core.outputs import check_output

    gguf = str(args.output).lower().endswith(".gguf")
    check_output(args.output, args.overwrite, folder=not gguf, flag="output")  # before the model loads
    model, tok, src = _load(args)
    sampling = generation_defaults(src)  # carried over, as llama.cpp's converter does
    if gguf:
        from efficientml.llm.io.gguf_write import save_gguf

        out = save_gguf(model, tok, args.output, outtype=args.outtype, overwrite=args.overwrite, sampling=sampling)
        print(f"saved {out} (GGUF, {args.outtype}, {out.stat().st_size / 1e6:.1f} MB)")
        return 0
    out = save_hf(model, tok, args.output, overwrite=args.overwrite, sampling=sampling)
    print(f"saved {out} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)")
    return 0
