"""Beyond the toy model: per-call costs of a Llama-3.2-1B-shaped model, and the speedups they predict.

    python -m runtime.scale [--schemes pte:int4 pte:int4:16384 pte:int4:linear_q4 onnx:int4 pte:none] [--exit-layer 4]

Random weights in the Llama 3.2 1B shape (16 layers, hidden 2048, GQA 32/8, vocab 128256, tied
embeddings, llama3 RoPE scaling). For each backend and scheme: median latency of a draft call
(1 token), verify calls (1 .. d+1 tokens) and a full-model step, optionally with a draft head over
the first K token ids (target:scheme:K) and, on the .pte, the 4-bit linears through our kernel
(target:scheme[:K]:linear_q4, export.py --pte-linear linear_q4); this machine's memory bandwidth;
the bandwidth roofline of a full step (weight bytes read per token / bandwidth); and the speedup
these measured costs *predict* at a range of acceptance rates. Random weights accept nothing, so
no speedup is measured here, only predicted. Writes scale.json and scale.md to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from typing import Optional
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import RECOMMENDED_FILE, save_checkpoint, write_json
from models.config import ModelConfig, RopeScaling
from runtime.errors import UserError
from models.model import Transformer
from runtime import measure

LLAMA_3_2_1B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), max_position_embeddings=131072, tie_word_embeddings=True)
ACCEPTANCE_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)


def memory_bandwidth_gbs(megabytes: int = 1024, repeats: int = 5) -> float:
    """Copy bandwidth (read + write bytes per second) of a large numpy copy, best of `repeats`."""
    src = np.ones(megabytes * 2**20 // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def weight_bytes_per_token(config: ModelConfig, bits: float) -> float:
    """Bytes of weights a full decode step reads: every linear layer once (the embedding row is negligible)."""
    linear_params = config.num_parameters() - config.vocab_size * config.hidden_size * (
        0 if config.tie_word_embeddings else 1)
    return linear_params * bits / 8


def random_checkpoint(directory: Path, exit_layer: int, d: int) -> Path:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(LLAMA_3_2_1B)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.lm_head.weight = model.embed_tokens.weight
    save_checkpoint(model, directory, bos_token_id=0, eos_token_ids=[1])
    from models.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(["def f(x):\n    return x\n"], 300).save(str(directory / "tokenizer.json"))
    (directory / RECOMMENDED_FILE).write_text(json.dumps({"exit_layer": exit_layer, "num_speculations": d}))
    return directory


def measure_scheme(checkpoint: Path, target: str, scheme: str, draft_vocab: int, exit_layer: int, d: int,
                   max_seq_len: int, work: Path, threads: int, pte_linear: str = "xnnpack",
                   group_size: Optional[int] = None) -> dict:
    from runtime.artifact import read_manifest
    from export.pipeline import ExportConfig, artifact_dir
    from runtime.bench import export_clean, matching_artifact
    from runtime.loader import open_artifact

    backend = "onnx" if target == "onnx" else "xnnpack"
    t = time.perf_counter()
    name = (f"{target}-{scheme}" + (f"-{draft_vocab}" if draft_vocab else "")
            + ("-linear_q4" if pte_linear != "xnnpack" else "") + (f"-g{group_size}" if group_size is not None else ""))
    directory = artifact_dir(work / name, backend)
    cfg = ExportConfig(model=checkpoint, quant=scheme, backend=backend, max_seq_len=max_seq_len, max_tokens_per_call=16,
                       draft_vocab=draft_vocab, pte_linear=pte_linear, group_size=group_size, out=directory.parent)
    if not matching_artifact(directory, checkpoint, exit_layer, scheme, draft_vocab, cfg):  # else reuse --work's
        export_clean(cfg)
    export_s = time.perf_counter() - t
    manifest = read_manifest(directory)
    opened = open_artifact(directory, threads=threads)
    calls = measure.per_call_latency(opened.backend, d, position=256, n=20)
    size = sum(manifest.file_sizes.values())
    del opened
    gc.collect()
    return {"target": target, "scheme": manifest.quant, "group_size": manifest.group_size, "draft_vocab": draft_vocab,
            "size_mb": size / 1e6,
            "linear": manifest.extra.get("linear", "xnnpack") if target == "pte" else "onnxruntime",
            "export_s": export_s, "calls_ms": calls}


def predictions(calls: dict, d: int) -> dict:
    return {f"{a:.1f}": measure.predicted_speedup(calls, d, a) for a in ACCEPTANCE_RATES}


def markdown(result: dict) -> str:
    d = result["num_speculations"]
    lines = [f"Llama-3.2-1B shape, random weights, E={result['exit_layer']}, d={d}; {result['machine']['cpu']}, "
             f"{result['machine']['cores']} cores; memory copy bandwidth {result['bandwidth_gbs']:.1f} GB/s.", "",
             "| backend | scheme | group | linears | draft vocab | size MB | draft 1 tok ms | verify 1 ms | verify d ms | "
             "verify d+1 ms | verify d+1 / verify 1 | full step ms | roofline ms | "
             + " | ".join(f"predicted @{a}" for a in ACCEPTANCE_RATES) + " |",
             "|" + "---|" * (13 + len(ACCEPTANCE_RATES))]
    for r in result["runs"]:
        c = r["calls_ms"]
        cells = [r["target"], r["scheme"], str(r.get("group_size", "")), r.get("linear", ""),
                 str(r.get("draft_vocab") or "full"), f"{r['size_mb']:.0f}",
                 f"{c['draft_1']:.1f}", f"{c['verify_1']:.1f}", f"{c[f'verify_{d}']:.1f}",
                 f"{c[f'verify_{d + 1}']:.1f}", f"{c[f'verify_{d + 1}'] / c['verify_1']:.2f}x",
                 f"{c.get('full_1', float('nan')):.1f}", f"{r['roofline_ms']:.1f}"]
        cells += [f"{r['predicted_speedup'][f'{a:.1f}']:.2f}x" for a in ACCEPTANCE_RATES]
        lines.append("| " + " | ".join(cells) + " |")
    for skipped in result.get("skipped", []):
        lines.append(f"\n{skipped['target']} {skipped['scheme']}: not measured ({skipped['why']})")
    lines.append("\nPredicted speedup = tokens per step x min(full step, draft + verify 1) / (d+1 draft calls + "
                 "verify of d+1 tokens), tokens per step = (1 - a^(d+1)) / (1 - a) for acceptance rate a. "
                 "These are predictions from measured call costs, not measured speedups.")
    return "\n".join(lines) + "\n"


BITS = {"none": 32, "8da4w": 4.5, "8da8w": 8.5, "int4": 4.5, "int8": 8.5}  # incl. group scales


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="*", default=["pte:int4", "onnx:int4", "pte:none"],
                   help="target:scheme[:K][:linear_q4] (target pte or onnx; K: a draft head over K tokens; linear_q4: "
                        "the .pte's 4-bit linears through our kernel)")
    p.add_argument("--exit-layer", type=int, default=4)
    p.add_argument("--num-speculations", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="compute threads (0: the runtime's default)")
    p.add_argument("--group-size", type=int, help="4-bit layout of the exports (default: export.py's)")
    p.add_argument("--work", type=Path, help="where to keep the checkpoint and artifacts (default: a temp dir)")
    p.add_argument("--out", type=Path, default=Path("bench_results/scale"))
    a = p.parse_args(argv)
    from runtime.bench import machine

    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        t = time.perf_counter()
        checkpoint = work / "ckpt"
        if not (checkpoint / "model.safetensors").exists():
            print("[scale] writing a random Llama-3.2-1B-shaped checkpoint", file=sys.stderr, flush=True)
            random_checkpoint(checkpoint, a.exit_layer, a.num_speculations)
        bandwidth = memory_bandwidth_gbs()
        result = {"machine": machine(), "exit_layer": a.exit_layer, "num_speculations": a.num_speculations,
                  "config": LLAMA_3_2_1B.to_dict(), "bandwidth_gbs": bandwidth, "runs": []}
        for pair in a.schemes:
            target, scheme, *rest = pair.split(":")
            draft_vocab = next((int(x) for x in rest if x.isdigit()), 0)
            pte_linear = next((x for x in rest if not x.isdigit()), "xnnpack")
            print(f"[scale] {target} {scheme} draft vocab {draft_vocab or 'full'}, linears {pte_linear}",
                  file=sys.stderr, flush=True)
            try:
                r = measure_scheme(checkpoint, target, scheme, draft_vocab, a.exit_layer, a.num_speculations,
                                   a.max_seq_len, work, a.threads, pte_linear, a.group_size)
            except UserError as e:  # e.g. the fp32 .pte lowering needs more memory than this machine has
                print(f"[scale] {target} {scheme} skipped: {e}", file=sys.stderr, flush=True)
                result["skipped"] = result.get("skipped", []) + [{"target": target, "scheme": scheme, "why": str(e)}]
                continue
            r["roofline_ms"] = 1000 * weight_bytes_per_token(LLAMA_3_2_1B, BITS[scheme]) / (bandwidth * 1e9)
            r["predicted_speedup"] = predictions(r["calls_ms"], a.num_speculations)
            result["runs"].append(r)
            print(f"[scale] {target} {scheme}: {r['calls_ms']}", file=sys.stderr, flush=True)
        a.out.mkdir(parents=True, exist_ok=True)
        write_json(a.out / "scale.json", result)
        (a.out / "scale.md").write_text(markdown(result))
        print(markdown(result))
        print(f"[scale] done in {(time.perf_counter() - t) / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
