"""`dsjax generate --checkpoint PATH --prompt TEXT`: stream a completion to stdout.

The tokenizer is PATH/tokenizer.json when present, else the byte tokenizer. --chat wraps the prompt in
the DeepSeek chat template (--think opens R1's reasoning block); --speculative drafts with the MTP block.
"""
from __future__ import annotations

import os
import sys
import time

from dsjax.config import ConfigError


def _tokenizer(path: str):
    from dsjax.train.tokenizer import TokenizerError, load_tokenizer

    tok_file = os.path.join(path, "tokenizer.json")
    try:
        return load_tokenizer(tok_file if os.path.isfile(tok_file) else None)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None


def _check_args(args):
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.think and not args.chat:
        raise ConfigError("--think needs --chat (it opens the assistant turn of the chat template)")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint directory")


def run(args) -> int:
    _check_args(args)
    import dsjax
    from dsjax.infer.chat import chat_prompt, split_reasoning
    from dsjax.infer.generate import stream

    model = dsjax.from_pretrained(args.checkpoint, allow_nonfinite=args.allow_nonfinite)
    cfg = model.config
    tok = _tokenizer(args.checkpoint)
    if args.chat:
        ids = chat_prompt(args.prompt, tok, system=args.system, think=args.think)
    else:
        ids = ([tok.bos_id] if args.bos else []) + tok.encode(args.prompt)
    if not ids:
        raise ConfigError("--prompt is empty")
    if max(ids) >= cfg.vocab_size:
        raise ConfigError(f"tokenizer id {max(ids)} is outside the model's vocab_size {cfg.vocab_size}")
    if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceeds "
                          f"max_position_embeddings {cfg.max_position_embeddings}")
    stop = {tok.eos_id} | ({cfg.eos_token_id} if cfg.eos_token_id is not None else set())
    t0 = time.perf_counter()
    generated: list[int] = []
    printed = ""
    for chunk in stream(model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=sorted(stop),
                        speculative=args.speculative):
        generated += [int(t) for t in chunk[0] if int(t) not in stop]
        text = tok.decode(generated)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            continue
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    text = tok.decode(generated)
    sys.stdout.write(text[len(printed):] + "\n")
    if args.verbose:
        dt = time.perf_counter() - t0
        print(f"[{len(generated)} tokens in {dt:.2f}s incl. compile]", file=sys.stderr)
        if args.chat and args.think:
            reasoning, answer = split_reasoning(text, opened=True)
            print(f"[reasoning {len(reasoning)} chars, answer {len(answer)} chars]", file=sys.stderr)
    return 0


def register(sub, help_):
    p = sub.add_parser("generate", help=help_, description=help_)
    p.add_argument("--checkpoint", required=True, help="HF-layout or native checkpoint directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the DeepSeek chat template")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--think", action="store_true", help="open the assistant turn with <think> (R1)")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding (greedy only)")
    p.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend bos to a plain prompt")
    p.add_argument("--allow-nonfinite", action="store_true", help="load tensors holding NaN/Inf (refused by default)")
    p.add_argument("-v", "--verbose", action="store_true", help="timing and reasoning summary on stderr")
    p.set_defaults(func=run)
