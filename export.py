"""Export a LayerSkip checkpoint to ExecuTorch (.pte) and/or ONNX (.onnx) artifacts.

    python export.py --exit-layer 2 --quant int4                 # the shipped model -> artifacts/pte
    python export.py --model DIR --exit-layer 6 --backend all    # any Llama checkpoint -> artifacts/{pte,onnx}

--quant picks the best scheme each backend runs correctly:
    int4: XNNPACK 8da4w (int8 dynamic activations, int4 grouped weights; int4 embedding)
          ONNX    MatMulNBits int4 weights (block size --group-size), accuracy level 4 (int8 compute);
                  the embedding as GatherBlockQuantized int4
    int8: XNNPACK 8da8w (int8 dynamic activations, int8 per-channel weights; int8 embedding)
          ONNX    MatMulNBits / GatherBlockQuantized with 8-bit weights, accuracy level 4
          On x86, XNNPACK's 8-bit kernels cost little more for the d+1 tokens of a verify call than
          for one, its 4-bit ones ~4.5x more: int8 is the scheme that lets self-speculation pay there.
    none: float32. 8da4w / 8da8w name the XNNPACK schemes directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.methods import DEFAULT_METHODS, FUSED_DRAFT_METHOD
from export.pipeline import (BACKENDS, DEFAULT_GROUP_SIZE, LINEAR_Q4_MIN_PARAMETERS, PTE_ATTENTION, PTE_LINEAR,
                             ExportConfig, run_export)
from models.checkpoint import DEFAULT_MODEL_DIR
from runtime.errors import run_command


def parse_args(argv=None) -> ExportConfig:
    d = ExportConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="Llama checkpoint directory (default: shipped)")
    p.add_argument("--exit-layer", type=int, help="E: the draft runs layers [0, E) (default: the model's recommended)")
    p.add_argument("--num-speculations", type=int, help="d: draft tokens per step (default: the recommended)")
    p.add_argument("--quant", default=d.quant, help="none, int8, int4, 8da8w or 8da4w (see above)")
    p.add_argument("--group-size", type=int,
                   help="4-bit weight layout: input channels per scale; 0 = one scale per output channel (.pte "
                        "only); .onnx takes 16..256 (default per target: " +
                        ", ".join(f"{t} {g}" for t, g in DEFAULT_GROUP_SIZE.items()) + ")")
    p.add_argument("--max-seq-len", type=int, help="KV cache positions (default: min(max_position_embeddings, 2048))")
    p.add_argument("--max-tokens-per-call", type=int, default=d.max_tokens_per_call,
                   help="most tokens per draft/verify call; prompts are fed in chunks of this size")
    p.add_argument("--backend", default=d.backend, choices=BACKENDS,
                   help="xnnpack or portable (.pte), onnx (.onnx), all (xnnpack + onnx)")
    p.add_argument("--onnx-kv-cache", default=d.onnx_kv_cache, choices=("row", "gqa", "sdpa"),
                   help="ONNX attention and KV cache: row (default: our custom op layerskip.RowAttention, "
                        "runtime/kernels/ort_ops.cpp, built with g++ on first use, the app registers its library; "
                        "caches updated in place), gqa (ONNX Runtime's GroupQueryAttention in its place: no library "
                        "to ship, slower) or sdpa (standard ONNX ops only)")
    p.add_argument("--pte-attention", default=d.pte_attention, choices=PTE_ATTENTION,
                   help=".pte attention: row_sdpa (default; our kernel, runtime/kernels/row_sdpa.cpp, built on "
                        "first use with g++, in every method on one set of caches: a token's logits have the same "
                        "bits in any call as decoded alone, so greedy self-speculation and --lookup equal plain "
                        "decoding by construction, at plain attention's cost), row_invariant (the verify method "
                        "only, in XNNPACK ops; no compiler needed; the full-model method keeps custom_sdpa on caches "
                        "of its own), row_invariant_drafts (the draft method too, so that --lookup is exact), or "
                        "custom_sdpa (ExecuTorch's kernel everywhere, which rounds a row by the call's row count)")
    p.add_argument("--pte-linear", default=d.pte_linear, choices=PTE_LINEAR,
                   help=".pte 4-bit linears (--quant int4): xnnpack (XNNPACK's kernels) or linear_q4 (our kernel, "
                        "runtime/kernels/linear_q4.cpp, built on first use with g++: integer arithmetic per group, all "
                        "rows of a call in one pass over the weights, so that a d+1-row verify of a model too large "
                        "for the caches costs little more than a 1-row call). Default: the kernel the checkpoint's "
                        "layerskip.json records as measured faster for it (the shipped model: linear_q4), else "
                        f"linear_q4 for int4 models above {LINEAR_Q4_MIN_PARAMETERS // 10**6}M parameters, else xnnpack")
    p.add_argument("--onnx-linear", default=d.onnx_linear, choices=("matmulnbits", "linear_q4"),
                   help=".onnx 4-bit linears (--quant int4): linear_q4 (default: ONNX Runtime's 4-bit weights and "
                        "scales through our custom op layerskip.LinearQ4, runtime/kernels/ort_ops.cpp, activations to "
                        "8 bits per row, so a row has the same bits in any call, and the rows of a call share one pass "
                        "over the weights) or matmulnbits (ONNX Runtime's MatMulNBits: no library to ship, slower)")
    p.add_argument("--fused-draft", action="store_true",
                   help="also export draft_greedy (.pte only): d greedy drafts in one call; measured no faster "
                        "than d draft calls on XNNPACK here, and it packs the prefix weights a second time")
    p.add_argument("--draft-vocab", type=int, default=d.draft_vocab, metavar="K",
                   help="drafts exit through an LM head over the K most frequent tokens only (rows of the shared "
                        "head, stored again); verification keeps the full head, so output is unchanged. "
                        "0: the full head (default)")
    p.add_argument("--draft-threshold", type=float, metavar="TAU",
                   help="adaptive drafting: stop a step's drafts when the exit's top-1 probability falls below "
                        "TAU; stored in the artifact as the runtime's default (default: the model's recommended, "
                        "else 0 = always d drafts)")
    p.add_argument("--pad-drafts", action="store_true",
                   help=".onnx: draft calls reach ONNX Runtime with 2+ rows (an even count at blocks >= 64), as verify "
                        "calls do, so that drafts looked up in the context (runtime --lookup K) give greedy output "
                        "equal to plain decoding by construction; every 1-token draft call pays a second row")
    p.add_argument("--for-lookup", action="store_true",
                   help="export every target so that drafts looked up in the context (runtime --lookup K, then on by "
                        "default) give greedy output equal to plain decoding: --pte-attention row_sdpa (or "
                        "row_invariant_drafts), --pad-drafts. A checkpoint without layerskip.json (no LayerSkip training) also gets exit "
                        "layer L/4, --draft-threshold 0.99 and, above 16k tokens, --draft-vocab 256, unless given")
    p.add_argument("--no-draft-verify", action="store_true",
                   help="leave out draft_verify, the method that makes a looked-up step one call on artifacts exported "
                        "for exact lookup (models up to 50M parameters): it holds a second copy of the weights in "
                        "memory (the shipped ONNX int4 artifact without PyTorch: ~87 instead of ~81 MB)")
    p.add_argument("--jobs", type=int, metavar="N",
                   help=".pte: lower the methods in up to N processes at once (default: the cores this process may "
                        "use, e.g. under taskset, for models up to 300M parameters, else 1; 1: all in this process)")
    p.add_argument("--out", type=Path, default=d.out, help="output folder; artifacts go to OUT/pte and OUT/onnx")
    a = p.parse_args(argv)
    return ExportConfig(model=a.model, exit_layer=a.exit_layer, num_speculations=a.num_speculations, quant=a.quant,
                        group_size=a.group_size, max_seq_len=a.max_seq_len, max_tokens_per_call=a.max_tokens_per_call,
                        backend=a.backend, out=a.out, onnx_kv_cache=a.onnx_kv_cache, pte_attention=a.pte_attention,
                        pte_linear=a.pte_linear, onnx_linear=a.onnx_linear,
                        draft_vocab=a.draft_vocab, draft_threshold=a.draft_threshold, jobs=a.jobs,
                        pad_drafts=a.pad_drafts, for_lookup=a.for_lookup, draft_verify=not a.no_draft_verify,
                        methods=DEFAULT_METHODS + ((FUSED_DRAFT_METHOD,) if a.fused_draft else ()))


def main(argv=None) -> int:
    return run_command(lambda: run_export(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
