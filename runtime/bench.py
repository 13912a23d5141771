"""On-device latency benchmark: self-speculative vs autoregressive decoding, per backend and scheme.

    python -m runtime.bench --artifact artifacts/pte artifacts/onnx        # artifacts you exported
    python -m runtime.bench --export                                       # export {pte, onnx} x {fp32, int8, int4} first
    python -m runtime.bench --artifact artifacts/onnx --peers              # + ONNX Runtime GenAI's plain decoding
    python -m runtime.bench --export --baselines                           # + transformers and a two-model baseline
    python -m runtime.bench --sweep --exit-layers 1 2 3 4 --draft-lengths 2 3 4 6 [--write-recommended]

For each artifact: decode tokens/s (prompt excluded), time to first token, acceptance rate, tokens
per step, per-call latency of draft / verify / full-model calls, peak RSS (each mode in a fresh
process) and artifact size. Autoregressive decoding runs on the same artifact in the same process,
both through draft+verify and through the single full-model method; the speedup is against the
faster of the two. Medians over --repeats. Writes bench.json, bench.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from models.checkpoint import DEFAULT_MODEL_DIR, RECOMMENDED_FILE, write_json
from models.data import prompt_set
from runtime.errors import UserError
from runtime import measure
from runtime.loader import Opened, open_artifact, open_checkpoint, open_target
from runtime.rss import rss_probe

SCHEMES = ("none", "int8", "int4")


@dataclass
class BenchConfig:
    artifacts: list[Path] = field(default_factory=list)
    export: bool = False
    model: Path = DEFAULT_MODEL_DIR
    eager: bool = False
    prompts: str = "humaneval"
    limit: int = 164
    max_new_tokens: int = 128
    repeats: int = 3
    threads: int = 0
    provider: str = "cpu"  # ONNX Runtime's execution provider for .onnx artifacts: cpu or cuda
    rss: bool = True
    peers: bool = False
    baselines: bool = False
    peer_limit: int = 20
    sweep: bool = False
    exit_layers: tuple[int, ...] = ()
    draft_lengths: tuple[int, ...] = (2, 3, 4, 6)
    draft_thresholds: tuple[float, ...] = (0.0,)
    sweep_target: str = "pte"
    sweep_quant: str = "int4"
    write_recommended: bool = False
    out: Path = Path("bench_results")
    rss_only: bool = False
    positions: tuple[int, ...] = ()  # per-call costs also at these cache positions (calls_ms_by_position)
    lookup: int = 0  # K > 0: also self-speculation with drafts looked up in the context (mode spec_lookup)

    def __post_init__(self):
        if self.repeats < 1 or self.limit < 1 or self.max_new_tokens < 2:
            raise UserError("--repeats and --limit must be >= 1 and --max-new-tokens >= 2.")
        if self.lookup < 0:
            raise UserError(f"--lookup {self.lookup} must be >= 0 (0 is off).")
        if any(p < 1 for p in self.positions):
            raise UserError(f"--positions {' '.join(map(str, self.positions))}: each must be >= 1.")
        if self.provider not in ("cpu", "cuda"):
            raise UserError(f"--provider {self.provider}: choose cpu or cuda.")
        if not (self.artifacts or self.export or self.eager or self.sweep or self.rss_only):
            raise UserError("nothing to benchmark: pass --artifact DIR, --export, --eager or --sweep.")


def machine() -> dict:
    from export.pipeline import versions

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), **gpus()}


def gpus() -> dict:
    """{"gpus": [names]} as nvidia-smi lists them; {} without an NVIDIA driver."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return {}
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"gpus": [n.strip() for n in names if n.strip()]}


def encode_prompts(opened: Opened, texts: list[str], max_new_tokens: int) -> tuple[list[list[int]], int]:
    """Token ids of the prompts that fit the cache with room for max_new_tokens; and how many did not."""
    room = opened.backend.max_seq_len - max_new_tokens
    ids = [opened.tokenizer.encode(t) for t in texts]
    fitting = [i for i in ids if len(i) < room]
    return fitting, len(ids) - len(fitting)


def artifact_size_mb(opened: Opened) -> Optional[float]:
    sizes = opened.facts.get("file_sizes")
    return sum(sizes.values()) / 1e6 if sizes else None


def bench_one(label: str, opened: Opened, spec: dict, texts: list[str], cfg: BenchConfig) -> dict:
    prompts, skipped = encode_prompts(opened, texts, cfg.max_new_tokens)
    if not prompts:
        raise UserError(f"none of the {skipped} prompts fits {label}'s cache of {opened.backend.max_seq_len} positions "
                        f"with {cfg.max_new_tokens} new tokens; pass shorter --prompts or fewer --max-new-tokens.")
    d = opened.num_speculations
    eos = tuple(opened.eos_token_ids)
    print(f"[bench] {label}: {len(prompts)} prompts x {cfg.max_new_tokens} tokens x {cfg.repeats} repeats, d={d}",
          file=sys.stderr, flush=True)
    windows = measure.heldout_windows(opened.tokenizer.tokenizer, opened.tokenizer.bos_token_id or 0, eos[0])
    peers, built = format_peers(opened, spec, cfg) if cfg.peers else ({}, {})
    record = {"label": label, **opened.facts, "num_speculations": d, "prompts": len(prompts),
              "prompts_skipped_too_long": skipped, "size_mb": artifact_size_mb(opened),
              "heldout": measure.heldout_quality(opened.backend, windows),
              "calls_ms": measure.per_call_latency(opened.backend, d),
              "draft_threshold": opened.draft_threshold,
              "modes": measure.run_modes(opened.backend, prompts, d, cfg.max_new_tokens, eos, cfg.repeats,
                                         tau=opened.draft_threshold, peers=peers, lookup=cfg.lookup)}
    for name, facts in built.items():
        record["modes"]["peers"][name].update(facts)
    if spec.get("provider", "cpu") != "cpu":
        record.update(against_cpu_provider(opened, spec, prompts, windows, cfg))
    if cfg.positions:  # how each call's cost grows with the cache (attention reads every earlier position)
        last = measure.last_step_position(opened.backend, d)
        record["calls_ms_by_position"] = {str(min(p, last)): measure.per_call_latency(opened.backend, d, p, n=30)
                                          for p in cfg.positions}
    record["rss_probe"] = {**spec, "prompts": prompts[:3], "d": d, "max_new_tokens": cfg.max_new_tokens,
                           "threads": cfg.threads, "draft_threshold": opened.draft_threshold}
    if cfg.rss:
        record.update(probe_rss(record["rss_probe"], [m for m in record["modes"] if m in measure.MODES],
                                is_onnx(record)))
    m = record["modes"]
    b = opened.backend
    record["layer_bound_speedup"] = measure.layer_bound_speedup(
        b.num_layers, b.exit_layer, m["spec"]["mean_drafts_per_step"], m["spec"]["mean_tokens_per_step"])
    record["call_bound_speedup"] = measure.call_bound_speedup(
        record["calls_ms"], m["spec"]["mean_drafts_per_step"], m["spec"]["mean_tokens_per_step"])
    print(f"[bench] {label}: spec {m['spec']['decode_tokens_per_s']:.1f} tok/s vs AR "
          f"{max(m[k]['decode_tokens_per_s'] for k in ('ar', 'ar_full') if k in m):.1f} -> {m.get('speedup', 0):.2f}x, "
          f"acceptance {m['spec']['acceptance_rate']:.2f}", file=sys.stderr, flush=True)
    return record


def against_cpu_provider(opened: Opened, spec: dict, prompts: list[list[int]], windows: list[list[int]],
                         cfg: BenchConfig) -> dict:
    """The same artifact on ONNX Runtime's CPU provider: the fraction of prompts whose greedy tokens
    (autoregressive and self-speculative on this provider) equal the CPU provider's autoregressive
    tokens, and the CPU provider's held-out loss."""
    cpu = open_target({**spec, "provider": "cpu"}, cfg.threads)
    eos, d, tau = tuple(opened.eos_token_ids), opened.num_speculations, opened.draft_threshold
    reference = measure.greedy_tokens(cpu.backend, prompts, measure.mode_config("ar", d, cfg.max_new_tokens, eos))
    identical = {}
    for mode in ("ar", "spec"):
        config = measure.mode_config(mode, d, cfg.max_new_tokens, eos, tau)
        tokens = measure.greedy_tokens(opened.backend, prompts, config)
        identical[mode] = sum(a == b for a, b in zip(tokens, reference)) / len(prompts)
    return {"greedy_identical_to_cpu_provider": identical,
            "heldout_cpu_provider": measure.heldout_quality(cpu.backend, windows)}


def peer_checkpoint(m, model: Path) -> Path:
    """The checkpoint directory the artifact was exported from, for its peers: its recorded source (a directory, or
    a .gguf file, imported), else `model` (--model); either must have the recorded source's hash, or the peers
    would decode another model."""
    from models.checkpoint import checkpoint_dir, checkpoint_hash

    source, recorded = Path(m.source.get("path", "")), m.source.get("sha256")
    directory = checkpoint_dir(source if source.exists() and str(source) != "." else model)  # a .gguf: imported
    if recorded and checkpoint_hash(directory) != recorded:
        raise UserError(f"--peers builds the plain decoders from the checkpoint artifact '{m.directory}' was exported "
                        f"from ('{source}', hash {recorded}), which is not here or has changed since, and --model "
                        f"'{model}' is another checkpoint: pass --model with the checkpoint (directory or .gguf) it "
                        f"was exported from.")
    return directory


def format_peers(opened: Opened, spec: dict, cfg: BenchConfig) -> tuple[dict, dict]:
    """The fastest plain decoders of the artifact's format, built from its checkpoint at its bits and
    block/group size: ({name: decoder}, {name: build facts}). ONNX: ONNX Runtime GenAI; .pte:
    ExecuTorch's Llama export and runner."""
    if spec["kind"] != "artifact":
        return {}, {}
    from runtime.artifact import read_manifest
    from runtime import peers

    m = read_manifest(spec["path"])
    checkpoint = peer_checkpoint(m, cfg.model)
    if m.format == "onnx":
        name, what = "ort_genai", f"ORT GenAI's builder ({m.quant}, block {m.group_size})"
        directory = cfg.out / "artifacts" / "peers" / f"ort_genai_{m.quant}_b{m.group_size}"
    elif m.quant in peers.ET_QUANTIZATION:
        name, what = "executorch_llama", f"ExecuTorch's Llama export ({m.quant}, group {m.group_size or 'per channel'})"
        bits = "int4" if m.quant == "8da4w" else "fp32"  # no scheme name in the path (see build_executorch_llama)
        directory = cfg.out / "artifacts" / "peers" / f"executorch_llama_{bits}_g{m.group_size}"
    else:
        return {}, {}
    print(f"[bench] building {checkpoint} with {what}", file=sys.stderr, flush=True)
    if name == "ort_genai":
        seconds = peers.build_ort_genai(checkpoint, directory, m.quant, m.group_size, cfg.threads)
        decoder = peers.OrtGenAIDecoder(directory)
    else:
        seconds = peers.build_executorch_llama(checkpoint, directory, m.group_size, m.max_seq_len, m.quant)
        decoder = peers.ExecuTorchLlamaDecoder(directory, opened.tokenizer)
    return {name: decoder}, {name: {"build_s": seconds, "directory": str(directory), "group_size": m.group_size}}


def probe_rss(spec: dict, modes: list[str], torch_free: bool = False) -> dict:
    """Peak RSS per mode, each in a fresh process, and the RSS of the imported runtimes alone; with
    `torch_free` (ONNX artifacts) also on the path an app installed without PyTorch runs."""
    out = {}
    for suffix in ("", "_torch_free") if torch_free else ("",):
        probes = {m: rss_probe({**spec, "mode": m, "torch_free": bool(suffix)}) or {} for m in modes}
        out["peak_rss_mb" + suffix] = {m: p.get("peak_rss_mb") for m, p in probes.items()}
        out["runtime_baseline_rss_mb" + suffix] = {m: p.get("baseline_rss_mb") for m, p in probes.items()}
        if suffix:
            out["torch_imported" + suffix] = any(p.get("torch_imported", True) for p in probes.values())
    return out


def is_onnx(record: dict) -> bool:
    return str(record.get("backend", "")).startswith("onnx")


def remeasure_rss(out: Path) -> dict:
    """Peak RSS again for every run of an earlier OUT/bench.json (the probes' specs are stored there)."""
    path = out / "bench.json"
    if not path.exists():
        raise UserError(f"--rss-only needs an earlier run's {path}; run the benchmark first.")
    results = json.loads(path.read_text())
    others = {**results.get("peers", {}), **results.get("baselines", {})}  # "peers": runs before 2026-11-26
    for record in results["runs"] + [p for p in others.values() if "rss_probe" in p]:
        modes = [m for m in record["modes"] if m in measure.MODES]
        print(f"[bench] peak RSS of {record.get('label', 'two-model')}", file=sys.stderr, flush=True)
        record.update(probe_rss(record["rss_probe"], modes, is_onnx(record)))
    return results


def _child(fn, args) -> None:
    try:
        fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def in_fresh_process(fn, *args) -> None:
    """Run an export in a spawned process.

    The exporter leaves millions of Python objects behind; in the measuring process they would make
    every garbage collection slow and tax the modes that run more Python per token (AR more than
    self-speculation), so exports never run in the process that times decoding.
    """
    import multiprocessing

    child = multiprocessing.get_context("spawn").Process(target=_child, args=(fn, args))
    child.start()
    child.join()
    if child.exitcode == -9:
        raise UserError(f"{fn.__name__} was killed (SIGKILL, usually out of memory); free memory or use a smaller "
                        f"scheme and rerun.")
    if child.exitcode != 0:
        raise UserError(f"{fn.__name__} failed in its export process (exit {child.exitcode}, see above); fix that "
                        f"and rerun.")


def export_clean(export_cfg) -> list[Path]:
    from export.pipeline import artifact_dir, run_export

    in_fresh_process(run_export, export_cfg)
    return [artifact_dir(export_cfg.out, t) for t in export_cfg.targets()]


def matching_artifact(directory: Path, model: Path, exit_layer: int, quant: str, draft_vocab: int = 0,
                      cfg=None) -> bool:
    """An earlier sweep's artifact for the same checkpoint, exit layer, scheme, layout, draft vocabulary and .pte
    linears (reused); `cfg`: the ExportConfig it would be exported with (else the defaults)."""
    from export.pipeline import ExportConfig
    from models.checkpoint import checkpoint_hash, read_checkpoint
    from runtime.artifact import read_manifest
    from quant.onnx_schemes import resolve_onnx_scheme
    from quant.torchao_schemes import resolve_scheme

    try:
        m = read_manifest(directory)
    except UserError:
        return False
    scheme = resolve_onnx_scheme(quant) if m.format == "onnx" else resolve_scheme(quant)
    ckpt = read_checkpoint(model)
    cfg = cfg or ExportConfig(model=model)
    group_size = cfg.group_size_for(m.format, ckpt.config, ckpt.recommended)
    linear = m.extra.get("linear", "xnnpack") if m.format == "pte" else ""
    expected = cfg.pte_linear_for(ckpt.config, scheme, ckpt.recommended) if m.format == "pte" else ""
    return (m.exit_layer, m.quant, m.group_size, m.draft_vocab, linear, m.source.get("sha256")) == (
        exit_layer, scheme, group_size, draft_vocab, expected, checkpoint_hash(model))


def export_grid(cfg: BenchConfig) -> list[Path]:
    from export.pipeline import ExportConfig

    dirs = []
    for scheme in SCHEMES:
        dirs += export_clean(ExportConfig(model=cfg.model, quant=scheme, backend="all",
                                          out=cfg.out / "artifacts" / scheme))
    return dirs


def artifact_label(facts: dict) -> str:
    """e.g. 'pte/xnnpack 8da4w', 'pte/xnnpack 8da4w row_invariant', 'pte/xnnpack 8da4w row_sdpa linear_q4',
    'onnx/onnxruntime matmulnbits-int4 sdpa', '... draft vocab 1024'."""
    label = f"{facts['backend']} {facts.get('quant', 'fp32')}"
    for key, default in (("kv_cache", "row"), ("attention", "custom_sdpa")):
        if facts.get(key, default) != default:
            label += f" {facts[key]}"
    if facts["backend"].startswith("pte") and facts.get("linear") == "linear_q4":
        label += " linear_q4"
    return label + (f" draft vocab {facts['draft_vocab']}" if facts.get("draft_vocab") else "")


def label_by_path_where_alike(runs: list[dict]) -> None:
    """Runs whose labels collide (two models at the same scheme) are told apart by their artifact path."""
    labels = [r["label"] for r in runs]
    for r in runs:
        if labels.count(r["label"]) > 1 and r.get("artifact"):
            r["label"] += f" ({r['artifact']})"


def run_benchmarks(cfg: BenchConfig) -> dict:
    texts = [p["prompt"] for p in prompt_set(cfg.prompts)[:cfg.limit]]
    artifacts = list(cfg.artifacts) + (export_grid(cfg) if cfg.export else [])
    specs = [{"kind": "artifact", "path": str(a), "provider": cfg.provider} for a in artifacts]
    if cfg.eager:
        specs.append({"kind": "eager", "path": str(cfg.model)})
    results = {"machine": machine(), "settings": settings(cfg), "runs": []}
    for spec in specs:
        opened = open_target(spec, cfg.threads)
        label = artifact_label(opened.facts) + (f" on {cfg.provider}" if spec.get("provider", "cpu") != "cpu" else "")
        results["runs"].append(bench_one(label, opened, spec, texts, cfg))
        del opened
    label_by_path_where_alike(results["runs"])
    if cfg.baselines:
        results["baselines"] = run_baselines(cfg, texts)
    if cfg.sweep:
        results["sweep"] = run_sweep(cfg, texts)
    return results


def settings(cfg: BenchConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
            for k, v in cfg.__dict__.items()}


# ---------------------------------------------------------------- baselines


def run_baselines(cfg: BenchConfig, texts: list[str]) -> dict:
    """transformers (plain greedy, assistant_early_exit) and a two-model speculation baseline."""
    from export.pipeline import ExportConfig, resolve
    from runtime.two_model import TwoModelBackend, export_two_models, file_sizes

    r = resolve(ExportConfig(model=cfg.model))
    ours = open_checkpoint(cfg.model)
    prompts, _ = encode_prompts(ours, texts[:cfg.peer_limit], cfg.max_new_tokens)
    eos = tuple(ours.eos_token_ids)
    print(f"[bench] baselines on {len(prompts)} prompts", file=sys.stderr, flush=True)
    our_ar = measure.greedy_tokens(ours.backend, prompts, measure.mode_config("ar", 1, cfg.max_new_tokens, eos))
    del ours
    peers = {}
    for name, exit_layer in (("transformers_greedy", None), ("transformers_assistant_early_exit", r.exit_layer)):
        out = measure.hf_generate(cfg.model, prompts, cfg.max_new_tokens, eos, exit_layer, cfg.threads)
        peers[name] = {"decode_tokens_per_s": out["decode_tokens_per_s"], "prompts": len(prompts),
                       "identical_to_ours": sum(a == b for a, b in zip(out["tokens"], our_ar)) / len(prompts)}
        print(f"[bench] {name}: {out['decode_tokens_per_s']:.1f} tok/s, identical to ours on "
              f"{peers[name]['identical_to_ours']:.0%} of prompts", file=sys.stderr, flush=True)
    directory = cfg.out / "artifacts" / "two_model"
    in_fresh_process(export_two_models, cfg.model, r.exit_layer, cfg.sweep_quant, 32, r.max_seq_len, 64, directory)
    paths = {role: directory / f"{role}.pte" for role in ("draft", "target")}
    num_layers = r.ckpt.config.num_hidden_layers
    backend = TwoModelBackend(paths, r.exit_layer, num_layers, r.max_seq_len, 64)
    modes = measure.run_modes(backend, prompts, r.num_speculations, cfg.max_new_tokens, eos, cfg.repeats,
                              modes=("spec",))
    spec = {"kind": "two_model", "paths": {k: str(v) for k, v in paths.items()}, "exit_layer": r.exit_layer,
            "num_layers": num_layers, "max_seq_len": r.max_seq_len}
    probe = {**spec, "prompts": prompts[:3], "d": r.num_speculations, "max_new_tokens": cfg.max_new_tokens,
             "threads": cfg.threads}
    peers["two_model_" + cfg.sweep_quant] = {"size_mb": file_sizes(paths) / 1e6, "modes": modes, "rss_probe": probe,
                                             **(probe_rss(probe, ["spec"]) if cfg.rss else {})}
    return peers


# ---------------------------------------------------------------- sweep over E and d


def sweep_point(run: dict, num_layers: int, e: int, d: int, tau: float) -> dict:
    spec = run["spec"]
    point = {"exit_layer": e, "num_speculations": d, "draft_threshold": tau,
             "spec_tokens_per_s": spec["decode_tokens_per_s"],
             "ar_tokens_per_s": spec["decode_tokens_per_s"] / run["speedup"], "speedup": run["speedup"],
             "acceptance_rate": spec["acceptance_rate"], "mean_tokens_per_step": spec["mean_tokens_per_step"],
             "mean_drafts_per_step": spec["mean_drafts_per_step"],
             "greedy_identical_fraction": run["greedy_identical_fraction"],
             "layer_bound_speedup": measure.layer_bound_speedup(num_layers, e, spec["mean_drafts_per_step"],
                                                                spec["mean_tokens_per_step"])}
    print(f"[sweep] E={e} d={d} tau={tau:g}: {point['speedup']:.2f}x (acceptance {point['acceptance_rate']:.2f}, "
          f"{point['mean_tokens_per_step']:.2f} tokens/step)", file=sys.stderr, flush=True)
    return point


def run_sweep(cfg: BenchConfig, texts: list[str]) -> dict:
    from export.pipeline import ExportConfig
    from models.checkpoint import read_checkpoint

    n = read_checkpoint(cfg.model).config.num_hidden_layers
    exit_layers = cfg.exit_layers or tuple(range(1, n))
    surface = []
    for e in exit_layers:
        directory = cfg.out / "sweep" / f"e{e}"
        target = directory / ("onnx" if cfg.sweep_target == "onnx" else "pte")
        if not matching_artifact(target, cfg.model, e, cfg.sweep_quant):
            export_clean(ExportConfig(model=cfg.model, exit_layer=e, quant=cfg.sweep_quant, out=directory,
                                      backend="onnx" if cfg.sweep_target == "onnx" else "xnnpack"))
        opened = open_artifact(target, threads=cfg.threads)
        prompts, _ = encode_prompts(opened, texts, cfg.max_new_tokens)
        eos = tuple(opened.eos_token_ids)
        for d in cfg.draft_lengths:
            for tau in cfg.draft_thresholds:
                # the baseline is re-measured beside each point, interleaved repeat by repeat, so that the
                # machine's drift over the minutes of a sweep does not skew one ratio against another
                run = measure.run_modes(opened.backend, prompts, d, cfg.max_new_tokens, eos, cfg.repeats, tau=tau)
                surface.append(sweep_point(run, n, e, d, tau))
    best = max(surface, key=lambda p: p["speedup"])
    if cfg.write_recommended:
        write_json(Path(cfg.model) / RECOMMENDED_FILE, {
            **read_checkpoint(cfg.model).recommended,  # other facts (the 4-bit layout) stay
            "exit_layer": best["exit_layer"], "num_speculations": best["num_speculations"],
            "draft_threshold": best["draft_threshold"],
            "measured": {"speedup": round(best["speedup"], 3), "quant": cfg.sweep_quant, "target": cfg.sweep_target,
                         "prompts": cfg.prompts, "machine": machine()["cpu"], "date": machine()["date"]}})
    return {"surface": surface, "best": best}


# ---------------------------------------------------------------- output


def without_torch_note(runs: list[dict]) -> str:
    baselines = [v for r in runs for v in (r.get("runtime_baseline_rss_mb_torch_free") or {}).values() if v]
    if not baselines:
        return ""
    return (f" ONNX artifacts are also measured on the path an app installed from requirements-onnx.txt runs "
            f"(no PyTorch: ~{statistics.median(baselines):.0f} MB before any model is opened).")


def positions_table(runs: list[dict]) -> list[str]:
    """Per-call ms at each measured cache position, and the speedup those costs predict at the run's
    acceptance (measure.predicted_speedup)."""
    runs = [r for r in runs if r.get("calls_ms_by_position")]
    if not runs:
        return []
    lines = ["", "Per-call cost by cache position (ms, median of 30 calls):", "",
             "| artifact | position | draft | verify 1 | verify d+1 | full | predicted speedup at this run's acceptance |",
             "|" + "---|" * 7]
    for r in runs:
        d, acceptance = r["num_speculations"], r["modes"]["spec"]["acceptance_rate"]
        for position, c in r["calls_ms_by_position"].items():
            full = f"{c['full_1']:.3f}" if "full_1" in c else "-"
            lines.append(f"| {r['label']} | {position} | {c['draft_1']:.3f} | {c['verify_1']:.3f} | "
                         f"{c[f'verify_{d + 1}']:.3f} | {full} | {measure.predicted_speedup(c, d, acceptance):.2f}x |")
    return lines


def exactness_table(runs: list[dict]) -> list[str]:
    """Greedy self-speculation against plain decoding (draft + 1-token verify calls), per artifact, and
    for the prompts where they part, by how much plain decoding preferred its own token there; and against
    plain decoding through the full-model call, another graph whose rounding may differ."""
    runs = [r for r in runs if "greedy_identical_fraction" in r["modes"]]
    if not runs:
        return []
    lines = ["", "Greedy self-speculation against plain decoding (gap: plain decoding's logit of its token minus "
                 "that of self-speculation's token, at the first token where they part):", "",
             "| artifact | identical prompts | first divergences (prompt: token index, gap / top logit) "
             "| identical to the full-model call |",
             "|---|---|---|---|"]
    for r in runs:
        m = r["modes"]
        parts = ", ".join(f"{v['prompt']}: {v['index']}, {v['gap']:.2g} / {v['top']:.1f}"
                          for v in m.get("greedy_divergences", []))
        full = m.get("greedy_identical_to_full_call_fraction")
        n = r["prompts"]
        same_as_full = "-" if full is None else f"{round(full * n)} of {n}"
        lines.append(f"| {r['label']} | {round(m['greedy_identical_fraction'] * n)} of {n} | {parts or '-'} | "
                     f"{same_as_full} |")
    return lines


def lookup_table(runs: list[dict]) -> list[str]:
    """Self-speculation with drafts looked up in the context (--lookup), against the same run's plain decoders."""
    runs = [r for r in runs if measure.LOOKUP_MODE in r["modes"]]
    if not runs:
        return []
    lines = ["", "With drafts looked up in the context (--lookup: a step whose last 2 tokens occurred earlier drafts "
                 "what followed them (a repeating run continued), in one prefix call, or one call with the verify "
                 "where the artifact has draft_verify; a step without one, what followed its last token "
                 "(decoding.default_lookup_fallback), or exit drafts, guessed by cheap calls where the backend has "
                 "them (decoding.default_exit_guesses), or one full-model call where that call is exact "
                 "(decoding.default_unmatched_step); greedy output equals plain decoding by construction on "
                 "artifacts exported with --pad-drafts (.onnx) or --pte-attention row_sdpa / row_invariant_drafts "
                 "(.pte), as measured otherwise):", "",
             "| artifact | self-spec tok/s | with lookup tok/s | speedup | vs fastest plain | steps drafted by lookup "
             "| acceptance | tokens/step | us/token: lookup steps / after a 1-token match / exit steps / "
             "full-call plain (share of tokens) "
             "| identical to plain (draft + verify) | to the full-model call |",
             "|" + "---|" * 11]
    for r in runs:
        m, n = r["modes"], r["prompts"]
        lk = m[measure.LOOKUP_MODE]
        full = lk.get("greedy_identical_to_full_call_fraction")
        vs_fastest = lk.get("speedup_vs_fastest_plain")
        lines.append(f"| {r['label']} | {m['spec']['decode_tokens_per_s']:.1f} | {lk['decode_tokens_per_s']:.1f} | "
                     f"**{lk['speedup']:.2f}x** | {'-' if vs_fastest is None else f'{vs_fastest:.2f}x'} | "
                     f"{lk['lookup_step_fraction']:.0%} | {lk['acceptance_rate']:.2f} | {lk['mean_tokens_per_step']:.2f} | "
                     f"{step_costs(lk, m)} | {round(lk['greedy_identical_fraction'] * n)} of {n} | "
                     f"{'-' if full is None else f'{round(full * n)} of {n}'} |")
    return lines


def step_costs(lookup: dict, modes: dict) -> str:
    """'148 (81%) / 252 (9%) / 337 (10%) / 222': the cost per token of each kind of step (decoding.generate:
    lookup, lookup_1, exit; 'plain' marks steps that matched nothing and made one full-model call), against plain
    decoding's."""
    kinds = lookup.get("steps_by_kind", {})
    parts = [f"{kinds[k]['us_per_token']:.0f} ({kinds[k]['token_share']:.0%}){' plain' if k == 'plain' else ''}"
             if k in kinds else "-" for k in ("lookup", "lookup_1", "plain" if "plain" in kinds else "exit")]
    full = modes.get("ar_full", {}).get("decode_tokens_per_s")
    return " / ".join(parts + [f"{1e6 / full:.0f}" if full else "-"])


def markdown(results: dict) -> str:
    mach = results["machine"]
    baselines = [v for r in results["runs"] for v in (r.get("runtime_baseline_rss_mb") or {}).values() if v]
    lines = [f"Machine: {mach['cpu']}, {mach['cores']} cores; {mach['date']}. Peak RSS is measured in a fresh "
             f"process per mode and includes the imported runtimes"
             + (f" (~{statistics.median(baselines):.0f} MB before any model is opened)." if baselines else ".")
             + without_torch_note(results["runs"])]
    if results["runs"]:
        lines += ["", "| artifact | size MB | held-out loss | AR tok/s (draft+verify) | AR tok/s (full call) | "
                  "self-spec tok/s | speedup | layer bound | call bound | acceptance | tokens/step | TTFT ms | "
                  "draft ms | verify d+1 ms | full ms | RSS AR full MB | RSS AR MB | RSS spec MB | "
                  "RSS spec without torch MB |",
                  "|" + "---|" * 19]
        for r in results["runs"]:
            m, c = r["modes"], r["calls_ms"]
            rss = r.get("peak_rss_mb") or {}
            app = r.get("peak_rss_mb_torch_free") or {}
            d = r["num_speculations"]
            cells = [r["label"], f"{r['size_mb']:.1f}" if r.get("size_mb") else "-", f"{r['heldout']['loss']:.3f}",
                     f"{m['ar']['decode_tokens_per_s']:.1f}",
                     f"{m['ar_full']['decode_tokens_per_s']:.1f}" if "ar_full" in m else "-",
                     f"{m['spec']['decode_tokens_per_s']:.1f}", f"**{m['speedup']:.2f}x**",
                     f"{r['layer_bound_speedup']:.2f}x",
                     f"{r['call_bound_speedup']:.2f}x" if "call_bound_speedup" in r else "-",
                     f"{m['spec']['acceptance_rate']:.2f}", f"{m['spec']['mean_tokens_per_step']:.2f}",
                     f"{m['spec']['ttft_ms_median']:.1f}", f"{c['draft_1']:.3f}", f"{c[f'verify_{d + 1}']:.3f}",
                     f"{c['full_1']:.3f}" if "full_1" in c else "-",
                     *(f"{v:.0f}" if v else "-" for v in (rss.get("ar_full"), rss.get("ar"), rss.get("spec"),
                                                          app.get("spec")))]
            lines.append("| " + " | ".join(cells) + " |")
    lines += positions_table(results["runs"])
    lines += exactness_table(results["runs"])
    lines += lookup_table(results["runs"])
    on_gpu = [r for r in results["runs"] if "greedy_identical_to_cpu_provider" in r]
    if on_gpu:
        lines += ["", "The same artifact on ONNX Runtime's CPU provider (GPU: "
                  f"{', '.join(mach.get('gpus', [])) or 'unknown'}):", "",
                  "| artifact | held-out loss here | on the CPU provider | greedy AR tokens == CPU AR | "
                  "greedy self-spec tokens == CPU AR |", "|" + "---|" * 5]
        for r in on_gpu:
            same = r["greedy_identical_to_cpu_provider"]
            lines.append(f"| {r['label']} | {r['heldout']['loss']:.4f} | {r['heldout_cpu_provider']['loss']:.4f} | "
                         f"{same['ar']:.0%} | {same['spec']:.0%} |")
    with_peers = [r for r in results["runs"] if r["modes"].get("peers")]
    if with_peers:
        lines += ["", "Against the fastest plain decoder of the same format, same checkpoint, bits and block size "
                      "(paired repeats in the same process):", "",
                  "| artifact | plain decoder | its build s | its tok/s | our AR tok/s (full call) | greedy identical "
                  "to our AR | our self-spec tok/s | fastest plain | speedup vs fastest plain |",
                  "|" + "---|" * 9]
        for r in with_peers:
            m = r["modes"]
            for name, p in m["peers"].items():
                lines.append(f"| {r['label']} | {name} | {p.get('build_s', 0):.1f} | {p['decode_tokens_per_s']:.1f} | "
                             f"{m.get('ar_full', m['ar'])['decode_tokens_per_s']:.1f} | "
                             f"{p['greedy_identical_to_ar']:.0%} | {m['spec']['decode_tokens_per_s']:.1f} | "
                             f"{m['fastest_plain']} | **{m['speedup_vs_fastest_plain']:.2f}x** |")
    if "baselines" in results:
        lines += ["", "| baseline | tok/s | notes |", "|---|---|---|"]
        for name, p in results["baselines"].items():
            if "identical_to_ours" in p:
                lines.append(f"| {name} | {p['decode_tokens_per_s']:.1f} | greedy output identical to ours on "
                             f"{p['identical_to_ours']:.0%} of {p['prompts']} prompts |")
            else:
                lines.append(f"| {name} | {p['modes']['spec']['decode_tokens_per_s']:.1f} | {p['size_mb']:.1f} MB, "
                             f"peak RSS {(p.get('peak_rss_mb') or {}).get('spec') or 0:.0f} MB |")
    if "sweep" in results:
        lines += ["", "| E | d | tau | speedup | layer bound | acceptance | drafts/step | tokens/step | self-spec tok/s "
                      "| AR tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in results["sweep"]["surface"]:
            lines.append(f"| {p['exit_layer']} | {p['num_speculations']} | {p.get('draft_threshold', 0):g} | "
                         f"{p['speedup']:.2f}x | {p['layer_bound_speedup']:.2f}x | "
                         f"{p['acceptance_rate']:.2f} | {p.get('mean_drafts_per_step', p['num_speculations']):.2f} | "
                         f"{p['mean_tokens_per_step']:.2f} | {p['spec_tokens_per_s']:.1f} | {p['ar_tokens_per_s']:.1f} |")
        b = results["sweep"]["best"]
        lines.append(f"\nBest on this machine: E={b['exit_layer']}, d={b['num_speculations']}, "
                     f"tau={b.get('draft_threshold', 0):g} ({b['speedup']:.2f}x).")
    if results["runs"] or "sweep" in results:
        lines.append("\nLayer bound: the speedup the measured tokens/step allow at best, if a call cost only the "
                     "layers it runs (no extra cost for d+1 tokens, free LM head and overheads); "
                     "runtime/measure.py: layer_bound_speedup. Call bound: the same step at this artifact's "
                     "measured per-call costs (draft ms, verify ms by rows, full ms), as if nothing ran between "
                     "calls; runtime/measure.py: call_bound_speedup.")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if results["runs"]:
        runs = results["runs"]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(runs)), 4))
        x = np.arange(len(runs))
        bars = [("ar", "AR draft+verify"), ("ar_full", "AR full call"), ("spec", "self-speculative")]
        if any(measure.LOOKUP_MODE in r["modes"] for r in runs):
            bars.append((measure.LOOKUP_MODE, "self-speculative + lookup"))
        peer_names = sorted({n for r in runs for n in r["modes"].get("peers", {})})
        if peer_names:  # one bar per artifact: the peer of its format
            bars.append(("peer", f"peer's plain decoding ({', '.join(peer_names)})"))
        width = 0.8 / len(bars)
        for i, (mode, name) in enumerate(bars):
            vals = [max([p["decode_tokens_per_s"] for p in r["modes"].get("peers", {}).values()] or [0]) if mode == "peer"
                    else r["modes"].get(mode, {}).get("decode_tokens_per_s", 0) for r in runs]
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, vals, width, label=name)
        ax.set_xticks(x, [r["label"] for r in runs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the bars
        ax.set_title("Decode speed per backend and scheme")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "tokens_per_s.png", dpi=100)
        plt.close(fig)
    if "sweep" in results:
        surface = results["sweep"]["surface"]
        es = sorted({p["exit_layer"] for p in surface})
        ds = sorted({p["num_speculations"] for p in surface})
        grid = np.array([[max(p["speedup"] for p in surface if p["exit_layer"] == e and p["num_speculations"] == d)
                          for d in ds] for e in es])
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(ds)), ds)
        ax.set_yticks(range(len(es)), es)
        ax.set(xlabel="draft length d", ylabel="exit layer E", title="self-speculative speedup (best over tau)")
        for i in range(len(es)):
            for j in range(len(ds)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im)
        fig.tight_layout()
        fig.savefig(out / "speedup_surface.png", dpi=100)
        plt.close(fig)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", results)
    (out / "bench.md").write_text(markdown(results))
    plots(results, out)


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> Optional[BenchConfig]:
    d = BenchConfig(eager=True)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, nargs="*", default=[], help="exported artifact directories")
    p.add_argument("--export", action="store_true", help="export the {pte, onnx} x {fp32, int8, int4} grid first")
    p.add_argument("--model", type=Path, default=d.model,
                   help="checkpoint for --export, --eager, --baselines, --sweep (and --peers when an artifact's "
                        "recorded checkpoint has moved)")
    p.add_argument("--eager", action="store_true", help="also benchmark the eager PyTorch backend")
    p.add_argument("--prompts", default=d.prompts, help="humaneval, corpus or file:PATH (JSONL of {\"prompt\"})")
    p.add_argument("--limit", type=int, default=d.limit, help="use the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--provider", choices=("cpu", "cuda"), default=d.provider,
                   help="ONNX Runtime execution provider for .onnx artifacts; with cuda each run also decodes on "
                        "the CPU provider and records whether the tokens are identical")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS probes (one process per mode)")
    p.add_argument("--peers", action="store_true",
                   help="beside each artifact, the plain decoding of the same checkpoint, bits and group size by "
                        "ONNX Runtime GenAI (.onnx; pip install -e '.[peers]') or ExecuTorch's Llama runner (.pte)")
    p.add_argument("--baselines", action="store_true",
                   help="transformers generate / assistant_early_exit and a two-model speculation baseline")
    p.add_argument("--peer-limit", type=int, default=d.peer_limit)
    p.add_argument("--sweep", action="store_true", help="speedup over exit layer E and draft length d")
    p.add_argument("--exit-layers", type=int, nargs="*", default=[])
    p.add_argument("--draft-lengths", type=int, nargs="*", default=list(d.draft_lengths))
    p.add_argument("--draft-thresholds", type=float, nargs="*", default=list(d.draft_thresholds),
                   help="sweep: adaptive-drafting thresholds tau (0: always d drafts)")
    p.add_argument("--sweep-target", choices=("pte", "onnx"), default=d.sweep_target)
    p.add_argument("--sweep-quant", default=d.sweep_quant)
    p.add_argument("--write-recommended", action="store_true", help="store the sweep's best (E, d) in the model")
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--positions", type=int, nargs="*", default=[],
                   help="also measure every call's cost at these cache positions (e.g. 10 200 400 700)")
    p.add_argument("--rss-only", action="store_true", help="re-measure peak RSS of the runs in OUT/bench.json")
    p.add_argument("--lookup", type=int, default=0, metavar="K",
                   help="also measure self-speculation with up to K drafts looked up in the context (spec_lookup)")
    a = p.parse_args(argv)
    if a.rss_only:
        return BenchConfig(out=a.out, rss_only=True)
    return BenchConfig(artifacts=a.artifact, export=a.export, model=a.model, eager=a.eager, prompts=a.prompts,
                       limit=a.limit, max_new_tokens=a.max_new_tokens, repeats=a.repeats, threads=a.threads,
                       provider=a.provider, rss=not a.no_rss, peers=a.peers, baselines=a.baselines,
                       peer_limit=a.peer_limit, sweep=a.sweep,
                       exit_layers=tuple(a.exit_layers), draft_lengths=tuple(a.draft_lengths),
                       draft_thresholds=tuple(a.draft_thresholds), sweep_target=a.sweep_target,
                       sweep_quant=a.sweep_quant, write_recommended=a.write_recommended, out=a.out,
                       positions=tuple(a.positions), lookup=a.lookup)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
        if cfg is None:
            return 0
        t = time.perf_counter()
        results = remeasure_rss(cfg.out) if cfg.rss_only else run_benchmarks(cfg)
        write_results(results, cfg.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(results))
    print(f"wrote {cfg.out}/bench.json, bench.md and plots in {(time.perf_counter() - t) / 60:.1f} min",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
