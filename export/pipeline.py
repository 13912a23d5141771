"""Export as named stages: load, then per target quantize -> trace, lower and save (.pte) or
trace -> quantize -> cut -> save -> check (.onnx).

Each artifact is a directory (manifest.json, the model file(s), tokenizer.json), built in a
temporary directory beside the target and renamed into place, so a failed export never touches
an existing good artifact.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch

from models.checkpoint import DEFAULT_MODEL_DIR, checkpoint_hash, load_model, read_checkpoint
from models.draft_vocab import check_draft_vocab, draft_vocab_ids
from models.config import ModelConfig
from models.model import Transformer
from export.methods import DEFAULT_METHODS, FUSED_DRAFT_METHOD, LOOKUP_METHOD, LOOKUP_METHOD_MAX_PARAMETERS
from runtime.artifact import Manifest, exact_for_lookup, write_manifest
from runtime.decoding import check_draft_threshold
from runtime.errors import UserError

BACKENDS = ("xnnpack", "portable", "onnx", "all")
PTE_ATTENTION = ("row_invariant", "row_invariant_drafts", "row_sdpa", "custom_sdpa")  # export/to_pte.py
PTE_LINEAR = ("xnnpack", "linear_q4")  # the .pte's 4-bit linears: XNNPACK's, or ours (quant/linear_q4.py)
# Where --pte-linear is not given, 8da4w models above this size get linear_q4: on the Llama-3.2-1B shape (groups of
# 32) it predicts 1.16-1.59x at acceptance 0.8 against XNNPACK's 0.90-1.16x, its plain decoding as fast or faster
# (README, "Five sessions ago"); models that fit the caches keep XNNPACK's kernels, unless their layerskip.json records
# the kernel measured faster for them ("pte_linear"): both shipped models record linear_q4, whose layers are one call
# each (export/fused_layer.py): with lookup 6033.3 vs 5415.5 tok/s (shipped, against its joined linears' graph) and
# 4854.5 vs 4276.5 (deep16, against XNNPACK's kernels), full-call plain decoding 24-26% faster
# (results/bench_s42_*_pte_fused*.md).
LINEAR_Q4_MIN_PARAMETERS = 300_000_000
DEFAULT_DRAFT_LENGTH = 4
# The 4-bit weight layout per target when --group-size is not given: a group of G input channels per
# scale (0: one scale per output channel, .pte only), halved until it divides every linear's input
# width. A checkpoint may record the layout measured for it in layerskip.json ("group_size": {"pte":
# G, "onnx": B}); the shipped model records per channel / block 128, chosen by measurement (README,
# "4-bit layout": the fastest self-speculative decoding within 1.5% loss / 0.05 acceptance of fp32
# whose greedy output equals plain decoding on every benchmark prompt). Other checkpoints get groups
# of 32 on the .pte: one scale per output channel cost SmolLM2-135M 69% in held-out loss (3.559 vs
# fp32 2.110; group 32: 2.517), so it is a per-model choice, not a default.
DEFAULT_GROUP_SIZE = {"pte": 32, "onnx": 128}

# --for-lookup on a checkpoint without LayerSkip training (no layerskip.json): its exit drafts nothing worth
# verifying (SmolLM2-135M: acceptance 0.01 at layer 8 of 30), so a step without a match in the context
# decodes one token (tau 0.99), the exit at L/4 only splits the draft and verify calls, and at a large
# vocabulary a draft head over 256 tokens keeps the exit's head out of each draft call (SmolLM2: 1.53 ->
# 0.72 ms per .pte draft call). Measured through this flag: 1.53x / 1.42x its plain decoding (README, "Twelve sessions ago").
FOR_LOOKUP_UNTRAINED = {"draft_threshold": 0.99, "draft_vocab": 256, "large_vocab": 16384}


def check_layout(target: str, size: int) -> None:
    """A 4-bit layout the target supports: an ONNX MatMulNBits block size, else a .pte group size."""
    from quant.onnx_schemes import check_block_size
    from quant.torchao_schemes import check_group_size

    (check_block_size if target == "onnx" else check_group_size)(size)


@dataclass
class ExportConfig:
    model: Path = DEFAULT_MODEL_DIR
    exit_layer: Optional[int] = None  # None: the checkpoint's recommended one
    num_speculations: Optional[int] = None
    quant: str = "none"
    group_size: Optional[int] = None  # None: the checkpoint's recommended layout, else DEFAULT_GROUP_SIZE
    max_seq_len: Optional[int] = None  # None: min(max_position_embeddings, 2048)
    max_tokens_per_call: int = 64  # upper bound of the dynamic token dimension (prompt chunk size)
    backend: str = "xnnpack"
    out: Path = Path("artifacts")
    methods: tuple[str, ...] = DEFAULT_METHODS
    onnx_kv_cache: str = "row"  # "row" (our op, in place), "gqa" (ONNX Runtime's contrib op, in place), "sdpa" (standard)
    pte_attention: str = "row_sdpa"  # a row gets the same bits whatever the row count (export/to_pte.py)
    pte_linear: Optional[str] = None  # "linear_q4": 8da4w linears through our kernel; None: pte_linear_for()
    onnx_linear: Optional[str] = None  # int4 .onnx linears: "linear_q4" (our op), "matmulnbits"; None: onnx_linear_for
    draft_vocab: int = 0  # K > 0: drafts exit through a head over the K most frequent tokens only
    draft_threshold: Optional[float] = None  # tau stored in the manifest; None: the checkpoint's recommended (or 0)
    jobs: Optional[int] = None  # processes lowering .pte methods at once; None: the cores this process may use
    pad_drafts: bool = False  # ONNX: draft calls padded as verify calls are, so --lookup is exact (runtime/onnx_backend.py)
    for_lookup: bool = False  # every target exported for exact --lookup; untrained checkpoints: FOR_LOOKUP_UNTRAINED
    draft_verify: bool = True  # exact-lookup artifacts of small models get draft_verify (methods_for); False: never

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise UserError(f"--backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}.")
        from export.onnx_attention import ATTENTION_KINDS

        if self.onnx_kv_cache not in ATTENTION_KINDS:
            raise UserError(f"--onnx-kv-cache {self.onnx_kv_cache!r} is unknown; use one of {', '.join(ATTENTION_KINDS)}.")
        if self.pte_attention not in PTE_ATTENTION:
            raise UserError(f"--pte-attention {self.pte_attention!r} is unknown; use one of {', '.join(PTE_ATTENTION)}.")
        from quant.onnx_schemes import ONNX_LINEARS

        if self.onnx_linear is not None and self.onnx_linear not in ONNX_LINEARS:
            raise UserError(f"--onnx-linear {self.onnx_linear!r} is unknown; use one of {', '.join(ONNX_LINEARS)}.")
        if self.onnx_linear == "linear_q4" and "onnx" in self.targets():
            from quant.onnx_schemes import resolve_onnx_scheme

            if resolve_onnx_scheme(self.quant) != "int4":
                raise UserError(f"--onnx-linear linear_q4 computes 4-bit linears; it needs --quant int4, not "
                                f"{self.quant!r} (or drop --onnx-linear).")
        if self.pte_linear is not None and self.pte_linear not in PTE_LINEAR:
            raise UserError(f"--pte-linear {self.pte_linear!r} is unknown; use one of {', '.join(PTE_LINEAR)}.")
        if self.pte_linear == "linear_q4" and any(t != "onnx" for t in self.targets()):
            from quant.torchao_schemes import resolve_scheme

            if resolve_scheme(self.quant) != "8da4w":
                raise UserError(f"--pte-linear linear_q4 computes 4-bit linears; it needs --quant int4, not "
                                f"{self.quant!r} (or drop --pte-linear).")
        if self.for_lookup:
            if self.pte_attention == "custom_sdpa" or self.onnx_kv_cache == "sdpa":
                raise UserError("--for-lookup needs a row-invariant attention (--pte-attention row_sdpa or "
                                "row_invariant_drafts, --onnx-kv-cache gqa or row); drop --pte-attention custom_sdpa / "
                                "--onnx-kv-cache sdpa.")
            if self.pte_attention == "row_invariant":
                self.pte_attention = "row_invariant_drafts"
            self.pad_drafts = "onnx" in self.targets()
        if self.max_tokens_per_call < 2:
            raise UserError(f"--max-tokens-per-call {self.max_tokens_per_call} must be >= 2.")
        if self.num_speculations is not None and self.num_speculations < 1:
            raise UserError(f"--num-speculations {self.num_speculations} must be >= 1.")
        if self.draft_threshold is not None:
            check_draft_threshold(self.draft_threshold)
        if self.jobs is not None and self.jobs < 1:
            raise UserError(f"--jobs {self.jobs} must be >= 1 (1: lower every method in this process).")
        if self.pte_attention == "row_invariant_drafts" and FUSED_DRAFT_METHOD in self.methods:
            raise UserError("--fused-draft cannot go with --pte-attention row_invariant_drafts (its drafts would "
                            "attend through other caches than the draft method's); drop one of them.")
        if self.pad_drafts and "onnx" not in self.targets():
            raise UserError("--pad-drafts is for .onnx artifacts (ONNX Runtime computes a row alike in calls of 2+ "
                            "rows; ExecuTorch's custom_sdpa does not): add --backend onnx or all, or drop it.")
        if self.draft_vocab < 0:
            raise UserError(f"--draft-vocab {self.draft_vocab} must be >= 0 (0: the full head).")
        if self.max_seq_len is not None and self.max_seq_len < self.max_tokens_per_call:
            raise UserError(f"--max-seq-len {self.max_seq_len} must be >= --max-tokens-per-call "
                            f"{self.max_tokens_per_call}.")
        from quant.onnx_schemes import resolve_onnx_scheme
        from quant.torchao_schemes import resolve_scheme

        for target in self.targets():  # reject an unknown scheme or layout before any work is done
            scheme = resolve_onnx_scheme(self.quant) if target == "onnx" else resolve_scheme(self.quant)
            if scheme != "none" and self.group_size is not None:
                check_layout(target, self.group_size)

    def onnx_linear_for(self) -> str:
        """The .onnx linears: as given, else our layerskip.LinearQ4 at int4 (on the shipped model 1.25x vs 1.04x
        self-speculation over plain decoding through MatMulNBits, plain decoding itself 1.38x faster; README,
        "Three sessions ago") and ONNX Runtime's MatMulNBits at int8 (our op computes 4 bits only)."""
        from quant.onnx_schemes import resolve_onnx_scheme

        if self.onnx_linear is not None:
            return self.onnx_linear
        return "linear_q4" if resolve_onnx_scheme(self.quant) == "int4" else "matmulnbits"

    def group_size_for(self, target: str, config: ModelConfig, recommended: Optional[dict] = None) -> int:
        """target: "onnx", or "xnnpack" / "portable" / "pte" for the .pte; `recommended`: the checkpoint's
        layerskip.json."""
        if self.group_size is not None:
            return self.group_size
        key = "onnx" if target == "onnx" else "pte"
        group = int((recommended or {}).get("group_size", {}).get(key, DEFAULT_GROUP_SIZE[key]))
        check_layout(target, group)
        widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim)
        while group > 16 and any(w % group for w in widths):
            group //= 2
        return group

    def pte_linear_for(self, config: ModelConfig, scheme: str, recommended: Optional[dict] = None) -> str:
        """The .pte's linears: --pte-linear; else at 8da4w the checkpoint's recorded choice (layerskip.json
        "pte_linear"), else linear_q4 above LINEAR_Q4_MIN_PARAMETERS; XNNPACK's for other schemes."""
        if self.pte_linear is not None:
            return self.pte_linear
        if scheme != "8da4w":
            return "xnnpack"  # our kernel computes 4-bit weights only
        recorded = (recommended or {}).get("pte_linear")
        if recorded is not None:
            if recorded not in PTE_LINEAR:
                raise UserError(f"layerskip.json records pte_linear '{recorded}'; it must be one of "
                                f"{', '.join(PTE_LINEAR)} (or be left out); fix the checkpoint's layerskip.json.")
            return recorded
        return "linear_q4" if config.num_parameters() > LINEAR_Q4_MIN_PARAMETERS else "xnnpack"

    def targets(self) -> list[str]:
        return ["xnnpack", "onnx"] if self.backend == "all" else [self.backend]

    def methods_for(self, target: str, config: ModelConfig) -> list[str]:
        """The methods of `target`'s artifact: --fused-draft's only on the .pte; draft_verify where it is
        exported for exact lookup (runtime.generate looks drafts up by default there), for a small model,
        unless --no-draft-verify."""
        methods = [m for m in self.methods if target != "onnx" or m != FUSED_DRAFT_METHOD]
        if (self.draft_verify and exact_for_lookup(target, self.pad_drafts, self.onnx_kv_cache, self.pte_attention)
                and config.num_parameters() <= LOOKUP_METHOD_MAX_PARAMETERS and LOOKUP_METHOD not in methods):
            methods.append(LOOKUP_METHOD)
        return methods

    @property
    def exact_lookup(self) -> bool:
        """Every target exported so that --lookup gives greedy output equal to plain decoding (its runtime
        default then; runtime.generate)."""
        return all(exact_for_lookup(t, self.pad_drafts, self.onnx_kv_cache, self.pte_attention) for t in self.targets())


@dataclass
class Resolved:
    """The settings an export ends up with, once the checkpoint has been read."""

    exit_layer: int
    num_speculations: int
    draft_threshold: float
    max_seq_len: int
    ckpt: object
    source_hash: str
    draft_vocab: Optional[torch.Tensor] = None  # the draft head's token ids, or None for the full head
    draft_vocab_ranked_by: str = ""


class Stages:
    """Runs named stages, printing progress and keeping their times for the summary."""

    def __init__(self, label: str):
        self.label = label
        self.times: dict[str, float] = {}

    def run(self, name: str, fn: Callable, *args, **kwargs):
        print(f"[{self.label}] {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t
        print(f"[{self.label}] {name} done in {self.times[name]:.1f} s", file=sys.stderr, flush=True)
        return result


def untrained_for_lookup(ckpt, cfg: ExportConfig) -> dict:
    """--for-lookup on a checkpoint that records no exit (no LayerSkip training, e.g. SmolLM2): what
    FOR_LOOKUP_UNTRAINED gives it where the flags leave it open, said in one line."""
    c = ckpt.config
    chosen = {}
    if cfg.exit_layer is None:
        chosen["exit_layer"] = max(1, round(c.num_hidden_layers / 4))
    if cfg.draft_threshold is None:
        chosen["draft_threshold"] = FOR_LOOKUP_UNTRAINED["draft_threshold"]
    if cfg.draft_vocab == 0 and c.vocab_size > FOR_LOOKUP_UNTRAINED["large_vocab"]:
        chosen["draft_vocab"] = FOR_LOOKUP_UNTRAINED["draft_vocab"]
    if chosen:
        print(f"[export] '{cfg.model}' records no exit (no layerskip.json): drafts come from the context; "
              + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items()) + " (pass them to choose otherwise)",
              file=sys.stderr, flush=True)
    return chosen


def lookup_defaults(recommended: dict, target: str) -> dict[str, int]:
    """The K of --lookup and of its runs (--lookup-run) that the checkpoint's layerskip.json records for a target beside
    exact lookup ("with_lookup": {"lookup": {"pte": K}, "lookup_run": {"pte": R}}), as the manifest's facts, which the
    runtime takes as its defaults; {} where it records none (the runtime's own defaults: decoding.DEFAULT_LOOKUP and
    LOOKUP_RUN)."""
    with_lookup = recommended.get("with_lookup", {})
    return {key: int(with_lookup[key][target]) for key in ("lookup", "lookup_run") if target in with_lookup.get(key, {})}


def resolve(cfg: ExportConfig) -> Resolved:
    ckpt = read_checkpoint(cfg.model)
    untrained = untrained_for_lookup(ckpt, cfg) if cfg.for_lookup and "exit_layer" not in ckpt.recommended else {}
    # Artifacts made for --lookup draft from the exit only where the context has no match: the checkpoint
    # may record the d and tau measured best for that ("with_lookup" in layerskip.json).
    recommended = {**ckpt.recommended, **(ckpt.recommended.get("with_lookup", {}) if cfg.exact_lookup else {}),
                   **untrained}
    exit_layer = cfg.exit_layer if cfg.exit_layer is not None else recommended.get("exit_layer")
    if exit_layer is None:
        raise UserError(f"checkpoint '{cfg.model}' records no recommended exit layer (no layerskip.json); pass "
                        f"--exit-layer E (python -m models.evaluate --model {cfg.model} shows each exit's acceptance), "
                        f"or --for-lookup to draft from the context only.")
    ckpt.config.check_exit_layer(int(exit_layer))
    d = cfg.num_speculations if cfg.num_speculations is not None else int(
        recommended.get("num_speculations", DEFAULT_DRAFT_LENGTH))
    if d + 1 > cfg.max_tokens_per_call:
        raise UserError(f"--num-speculations {d} needs verify calls of {d + 1} tokens but --max-tokens-per-call "
                        f"is {cfg.max_tokens_per_call}; raise it.")
    max_seq_len = cfg.max_seq_len or min(ckpt.config.max_position_embeddings, 2048)
    if max_seq_len < cfg.max_tokens_per_call:
        raise UserError(f"the cache of {max_seq_len} positions is shorter than --max-tokens-per-call "
                        f"{cfg.max_tokens_per_call}; pass a larger --max-seq-len.")
    tau = cfg.draft_threshold if cfg.draft_threshold is not None else float(recommended.get("draft_threshold", 0.0))
    r = Resolved(int(exit_layer), d, tau, max_seq_len, ckpt, checkpoint_hash(cfg.model))
    vocab = ckpt.config.vocab_size
    draft_vocab = untrained.get("draft_vocab", cfg.draft_vocab)
    check_draft_vocab(draft_vocab, vocab)
    if 0 < draft_vocab < vocab:
        r.draft_vocab, r.draft_vocab_ranked_by = draft_vocab_ids(cfg.model, vocab, draft_vocab)
    return r


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "executorch", "torchao", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def base_manifest(cfg: ExportConfig, r: Resolved, model: Transformer, extra: Optional[dict] = None,
                  **kw) -> Manifest:
    extra = dict(extra or {})
    if r.draft_vocab is not None:
        extra["draft_vocab"] = {"size": len(r.draft_vocab), "ranked_by": r.draft_vocab_ranked_by}
    return Manifest(
        model_config=model.config.to_dict(), exit_layer=r.exit_layer, num_speculations=r.num_speculations,
        draft_threshold=r.draft_threshold,
        max_seq_len=r.max_seq_len, max_tokens_per_call=cfg.max_tokens_per_call,
        bos_token_id=r.ckpt.bos_token_id, eos_token_ids=r.ckpt.eos_token_ids,
        group_size=cfg.group_size_for(kw["format"], model.config, r.ckpt.recommended),
        source={"path": str(cfg.model), "sha256": r.source_hash}, versions=versions(), extra=extra, **kw)


def replace_directory(tmp: Path, target: Path) -> None:
    """Move a finished artifact directory into place; the old one is removed only after the move."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_artifact(target: Path, write: Callable[[Path], Manifest], tokenizer: Path) -> Manifest:
    """write(tmp_dir) fills a temporary directory and returns its manifest; then it replaces target."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    os.chmod(tmp, 0o755)
    try:
        manifest = write(tmp)
        shutil.copy(tokenizer, tmp / "tokenizer.json")
        manifest.file_sizes = {f: (tmp / f).stat().st_size for f in manifest.files.values()}
        write_manifest(tmp, manifest)
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest.directory = target
    return manifest


def artifact_dir(out: Path | str, target: str) -> Path:
    """Where a target's artifact goes: OUT/onnx for ONNX, OUT/pte for the ExecuTorch backends."""
    return Path(out) / ("onnx" if target == "onnx" else "pte")


def export_target(cfg: ExportConfig, r: Resolved, model: Transformer, target: str) -> tuple[Manifest, dict]:
    if target == "onnx":
        from export.to_onnx import export_onnx as export_fn
    else:
        from export.to_pte import export_pte as export_fn
    directory = artifact_dir(cfg.out, target)
    stages = Stages(target)
    manifest = build_artifact(directory, lambda tmp: export_fn(cfg, r, model, tmp, stages), r.ckpt.tokenizer_path)
    return manifest, stages.times


def run_export(cfg: ExportConfig) -> list[Manifest]:
    r = resolve(cfg)
    if not r.ckpt.tokenizer_path.exists():
        raise UserError(f"checkpoint '{cfg.model}' has no tokenizer.json; the artifact needs one beside it.")
    load = Stages("load")
    model, _ = load.run("load", load_model, cfg.model)
    model.use_draft_vocab(r.draft_vocab)
    manifests = []
    targets = cfg.targets()
    for i, target in enumerate(targets):
        this_model = model if i == len(targets) - 1 else copy.deepcopy(model)  # quantization mutates it
        manifest, times = export_target(cfg, r, this_model, target)
        print_summary(manifest, {**load.times, **times})
        manifests.append(manifest)
    return manifests


def print_summary(m: Manifest, times: dict[str, float]) -> None:
    size = sum(m.file_sizes.values())
    print(f"exported {m.directory}: {m.format} ({m.backend}), methods {', '.join(m.methods)}, quant {m.quant}, "
          f"E={m.exit_layer}, d={m.num_speculations}, tau={m.draft_threshold:g}, max_seq_len={m.max_seq_len}, "
          f"draft vocab {m.draft_vocab or 'full'}, {size / 1e6:.1f} MB; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), file=sys.stderr)
