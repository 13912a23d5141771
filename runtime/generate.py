"""Generate text with self-speculative (default) or autoregressive decoding.

    python -m runtime.generate --prompt "def fib(n):"                      # eager, the shipped model
    python -m runtime.generate --model DIR --exit-layer 4 --prompt "..."  # eager, any Llama checkpoint
    python -m runtime.generate --artifact artifacts/default --prompt "..." # an exported .pte or .onnx
    python -m runtime.generate ... --ar                                   # plain autoregressive baseline

Streams the text, then prints a one-line summary; --json prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from runtime.errors import UserError
from runtime.decoding import (DEFAULT_LOOKUP, LOOKUP_RUN, RUN_MATCH, UNMATCHED_STEPS, GenerationConfig,
                              GenerationResult, generate, step_policy)
from runtime.loader import Opened, open_artifact, open_checkpoint
from runtime.rss import peak_rss_mb


class TextStream:
    """Decodes the growing token list and yields only the new text (holding back split UTF-8)."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.tokens: list[int] = []
        self.printed = 0

    def text(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        for s in self.stop_strings:
            if s in text:
                text = text[:text.index(s)]
        return text

    def push(self, new: list[int]) -> tuple[str, bool]:
        """(new printable text, whether a stop string appeared)."""
        self.tokens += new
        full = self.tokenizer.decode(self.tokens)
        stopped = any(s in full for s in self.stop_strings)
        text = self.text()
        if not stopped and text.endswith("\ufffd"):
            return "", False
        delta, self.printed = text[self.printed:], len(text)
        return delta, stopped


def run_generation(opened: Opened, prompt: str, cfg: GenerationConfig, stop_strings: tuple[str, ...] = (),
                   stream_to=None) -> tuple[GenerationResult, str]:
    prompt_ids = opened.tokenizer.encode(prompt)
    stream = TextStream(opened.tokenizer, stop_strings)

    def on_tokens(new: list[int]) -> bool:
        delta, stopped = stream.push(new)
        if stream_to is not None and delta:
            stream_to.write(delta)
            stream_to.flush()
        return stopped

    result = generate(opened.backend, prompt_ids, cfg, on_tokens)
    return result, stream.text()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, help="Hugging Face Llama checkpoint directory (default: the shipped model)")
    src.add_argument("--artifact", type=Path, help="exported artifact directory (manifest.json + .pte or .onnx)")
    p.add_argument("--exit-layer", type=int, help="E: draft with layers [0, E) (default: the recommended one)")
    p.add_argument("--num-speculations", type=int, help="d: draft tokens per step (default: the recommended one)")
    p.add_argument("--draft-threshold", type=float, metavar="TAU",
                   help="stop drafting when the exit's top-1 probability falls below TAU (default: the "
                        "recommended one; 0: always d drafts)")
    p.add_argument("--lookup", type=int, metavar="K",
                   help="also draft up to K tokens by looking up the context's last 2 tokens in the context (prompt "
                        "lookup): one prefix call for all of them; greedy output equal to plain decoding by "
                        "construction on artifacts exported with --pad-drafts (.onnx) or --pte-attention "
                        f"row_sdpa or row_invariant_drafts (.pte), as measured elsewhere (README); 0: off. Default: "
                        f"the K the checkpoint's layerskip.json records for the artifact (both shipped models' .pte: 2), else "
                        f"{DEFAULT_LOOKUP} on those artifacts, else off")
    p.add_argument("--lookup-run", type=int, metavar="K",
                   help="with --lookup: draft up to K tokens where the match reaches back further (a repeating run: "
                        f"{RUN_MATCH} tokens or more). Default: the K the checkpoint records (both shipped models' .pte: 6), "
                        f"else {LOOKUP_RUN['executorch']} on .pte artifacts (XNNPACK's calls grow slowly with rows), "
                        "else the --lookup K")
    p.add_argument("--lookup-fallback", type=int, metavar="K",
                   help="with --lookup: where the last 2 tokens never occurred before but the last token did, draft "
                        "up to K tokens that followed it (0: draft from the exit there). Default: 1 on .onnx "
                        "artifacts (the padding row of an exact one-row call) without --exit-guesses, 5 on .pte "
                        "artifacts with draft_verify and the row_invariant_drafts attention, else 0")
    p.add_argument("--exit-guesses", type=int, metavar="N",
                   help="a step drafting from the exit drafts N tokens by cheap draft calls (ONNX Runtime's unpadded "
                        "one) and verifies them with their prefix in one draft_verify call, which computes their rows "
                        "again with plain decoding's bits (0: exact draft calls and a verify call). Default: 1 on "
                        ".onnx artifacts exported for exact lookup, else 0")
    p.add_argument("--unmatched-step", choices=UNMATCHED_STEPS,
                   help="with --lookup: what a step does where no lookup matched: exit (draft from the early exit) or "
                        "plain (one full-model call). Default: plain on .pte artifacts attending through row_sdpa "
                        "(their full-model call has plain decoding's bits), else exit")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text")
    text.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument("--ar", action="store_true", help="plain autoregressive decoding (the baseline)")
    p.add_argument("--full-model", action="store_true",
                   help="with --ar: one full-model call per token instead of draft + verify calls")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-seq-len", type=int, help="eager only: KV cache positions (artifacts fix their own)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--threads", type=int, default=0, help="compute threads (0: the runtime's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    return p.parse_args(argv)


def lookup_drafts_per_step(requested: Optional[int], opened: Opened) -> int:
    """--lookup K as given; else, on artifacts exact for it (their exporter asked for it), the K their checkpoint
    records (export/pipeline.py: lookup_defaults), or DEFAULT_LOOKUP; else 0."""
    if requested is not None:
        return requested
    recorded = getattr(opened.backend, "default_lookup", None)
    return (recorded or DEFAULT_LOOKUP) if opened.facts.get("exact_lookup") else 0


def read_prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return args.prompt_file.read_text()
    except OSError as e:
        raise UserError(f"cannot read --prompt-file '{args.prompt_file}' ({e.strerror}).") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        prompt = read_prompt(args)
        if args.artifact is not None:
            opened = open_artifact(args.artifact, args.provider, args.threads, args.exit_layer, args.num_speculations,
                                   draft_threshold=args.draft_threshold)
        else:
            opened = open_checkpoint(args.model, args.exit_layer, args.num_speculations, args.max_seq_len, args.threads,
                                     args.draft_threshold, autoregressive=args.ar)
        cfg = GenerationConfig(
            max_new_tokens=args.max_new_tokens, self_speculative=not args.ar, num_speculations=opened.num_speculations,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            eos_token_ids=tuple(opened.eos_token_ids), full_model_baseline=args.full_model,
            draft_threshold=opened.draft_threshold, lookup=lookup_drafts_per_step(args.lookup, opened),
            lookup_run=args.lookup_run, lookup_fallback=args.lookup_fallback, exit_guesses=args.exit_guesses,
            unmatched_step=args.unmatched_step)
        policy = step_policy(opened.backend, cfg)
        if not args.json:
            sys.stdout.write(prompt)
        result, text = run_generation(opened, prompt, cfg, tuple(args.stop), None if args.json else sys.stdout)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = result.stats
    if args.json:
        print(json.dumps({"prompt": prompt, "text": text, "tokens": result.tokens,
                          "stats": {**stats.to_dict(), "peak_rss_mb": peak_rss_mb()},
                          "settings": {**opened.facts, "mode": "autoregressive" if args.ar else "self_speculative",
                                       "num_speculations": cfg.num_speculations,
                                       "draft_threshold": cfg.draft_threshold,
                                       **policy,
                                       "temperature": cfg.temperature,
                                       "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed}}))
    else:
        guesses = 0 if args.ar else policy["exit_guesses"]
        plain_unmatched = not args.ar and cfg.lookup and policy["unmatched_step"] == "plain"
        print(f"\n---\n[{'autoregressive' if args.ar else 'self-speculative'}, {opened.facts.get('backend')}, "
              f"E={opened.facts.get('exit_layer')}, d={cfg.num_speculations}, tau={cfg.draft_threshold:g}"
              f"{f', lookup {cfg.lookup}' if cfg.lookup else ''}{f', exit guesses {guesses}' if guesses else ''}"
              f"{', plain steps where no lookup matched' if plain_unmatched else ''}] "
              f"{stats.summary()}", file=sys.stderr)
    if stats.stop_reason == "max_seq_len":
        print(f"note: generation stopped at the cache's {opened.backend.max_seq_len} positions; "
              f"use a larger --max-seq-len (or re-export) for longer outputs.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
