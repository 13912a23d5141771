"""Train a LayerSkip model (layer dropout + early-exit loss) from scratch or from a Llama checkpoint.

    python -m models.train --out runs/default --steps 3000                 # from scratch on the stdlib corpus
    python -m models.train --out runs/ft --init-from DIR --steps 500       # continual pre-training
    torchrun --nproc-per-node 2 -m models.train --out runs/ddp ...         # DistributedDataParallel
    python -m models.train --out runs/gpu --device cuda ...                # one GPU (bf16 autocast)

The output directory is a Hugging Face Llama checkpoint (config.json, model.safetensors,
tokenizer.json, generation_config.json) plus train_log.json and train_loss.png. Training resumes
from OUT/train_state.pt when it exists; --restart ignores it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from models.checkpoint import atomic_write, load_model, save_checkpoint, write_json
from models.config import ModelConfig
from models.data import corpus_files, corpus_hash, encode_files, read_text, split_files
from runtime.errors import UserError, run_command
from models.layerskip import LayerSkipLoss, LayerSkipRecipe
from models.model import Transformer
from models.tokenizer import BOS, EOS, train_bpe_tokenizer

STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    out: Path
    steps: int = 3000
    init_from: Optional[Path] = None  # a Llama checkpoint to continue from; else random init
    # shape of a model trained from scratch
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 768
    tie_word_embeddings: bool = True
    # data
    corpus: Optional[Path] = None  # default: this interpreter's standard library
    tokenizer: Optional[Path] = None  # a tokenizer.json to reuse instead of training BPE on the corpus
    seq_len: int = 768
    batch_size: int = 16  # sequences per optimizer step, across all ranks
    # optimizer
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True  # autocast on CPUs with native bf16 (AVX512-BF16 / AMX); ignored elsewhere
    threads: int = 0  # 0: torch's default
    device: str = "cpu"  # "cuda": one GPU (under torchrun: the local rank's)
    checkpoint_every: int = 200
    eval_every: int = 200
    eval_batches: int = 4
    restart: bool = False
    recipe: LayerSkipRecipe = field(default_factory=LayerSkipRecipe)

    def __post_init__(self):
        for name in ("steps", "seq_len", "batch_size", "checkpoint_every", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1.")
        if not 0 <= self.warmup_steps < self.steps:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be in [0, --steps).")
        if self.lr <= 0:
            raise UserError("--lr must be positive.")
        if self.init_from is None and self.num_hidden_layers < 2:
            raise UserError("--layers must be >= 2: LayerSkip needs an exit layer before the last.")
        if self.init_from is None and self.recipe.focus_exit >= self.num_hidden_layers:
            raise UserError(f"--focus-exit {self.recipe.focus_exit} must be below --layers {self.num_hidden_layers}.")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device {self.device!r} is unknown; use cpu or cuda.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available to this PyTorch; train with --device cpu.")

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, max_position_embeddings=self.seq_len,
            tie_word_embeddings=self.tie_word_embeddings)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


# ---------------------------------------------------------------- setup


@dataclass
class Run:
    """Everything a training run holds."""

    cfg: TrainConfig
    model: Transformer
    loss_module: torch.nn.Module  # LayerSkipLoss, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    train_ids: np.ndarray
    heldout_ids: np.ndarray
    bos_id: int
    eos_ids: list[int]
    corpus: dict
    rank: int = 0
    world: int = 1
    step: int = 0
    log: list = field(default_factory=list)
    elapsed_s: float = 0.0


def init_distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def prepare_tokenizer(cfg: TrainConfig, root: Path, train_files: list[Path]):
    """From scratch: train BPE on the training split (or reuse --tokenizer). From a checkpoint: its tokenizer."""
    from tokenizers import Tokenizer

    if cfg.tokenizer is not None:
        if not Path(cfg.tokenizer).is_file():
            raise UserError(f"--tokenizer '{cfg.tokenizer}' does not exist; pass a tokenizer.json file.")
        return Tokenizer.from_file(str(cfg.tokenizer))
    if cfg.init_from is not None:
        path = Path(cfg.init_from) / "tokenizer.json"
        if not path.exists():
            raise UserError(f"--init-from '{cfg.init_from}' has no tokenizer.json; save the checkpoint's tokenizer there.")
        return Tokenizer.from_file(str(path))
    return train_bpe_tokenizer((read_text(f) for f in train_files), cfg.vocab_size)


def init_weights(model: Transformer, seed: int) -> None:
    """Normal(0, 0.02); residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_model(cfg: TrainConfig) -> tuple[Transformer, Optional[int], list[int]]:
    if cfg.init_from is not None:
        model, ckpt = load_model(cfg.init_from)
        if ckpt.config.num_hidden_layers < 2:
            raise UserError(f"--init-from '{cfg.init_from}' has one layer; LayerSkip needs at least two.")
        return model.train(), ckpt.bos_token_id, ckpt.eos_token_ids
    model = Transformer(cfg.model_config())
    init_weights(model, cfg.seed)
    return model.train(), 0, [1]  # ids of BOS and EOS in a tokenizer we trained


def setup(cfg: TrainConfig) -> tuple[Run, object]:
    rank, world = init_distributed()
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    root, files = corpus_files(cfg.corpus)
    train_files, heldout_files = split_files(root, files)
    if not heldout_files:
        heldout_files = train_files[-1:]
    model, bos_id, eos_ids = build_model(cfg)
    tokenizer = prepare_tokenizer(cfg, root, train_files)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                        f"{model.config.vocab_size}; pass a larger --vocab-size.")
    bos = bos_id if bos_id is not None else eos_ids[0]
    train_ids = encode_files(tokenizer, train_files, bos, eos_ids[0])
    heldout_ids = encode_files(tokenizer, heldout_files, bos, eos_ids[0])
    if len(train_ids) <= cfg.seq_len + 1:
        raise UserError(f"the corpus has only {len(train_ids)} tokens, fewer than --seq-len {cfg.seq_len}; "
                        f"add files or lower --seq-len.")
    model.to(cfg.device)
    loss_module = LayerSkipLoss(model, cfg.recipe.exit_distill)
    if world > 1:
        # Layer dropout can skip a layer for every local sample, leaving its parameters without a gradient.
        loss_module = DistributedDataParallel(loss_module, find_unused_parameters=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    corpus = {"root": str(root), "files": len(files), "train_files": len(train_files),
              "heldout_files": len(heldout_files), "sha256": corpus_hash(root, files),
              "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(heldout_ids))}
    run = Run(cfg, model, loss_module, optimizer, train_ids, heldout_ids, bos, eos_ids, corpus, rank, world)
    return run, tokenizer


# ---------------------------------------------------------------- batches and schedule


def batch(ids: np.ndarray, seq_len: int, rows: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = rng.integers(0, len(ids) - seq_len - 1, size=rows)
    window = np.stack([ids[s:s + seq_len + 1] for s in starts]).astype(np.int64)  # [rows, T+1]
    window = torch.from_numpy(window)
    return window[:, :-1], window[:, 1:]


def step_batch(run: Run, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's share of step `step`'s global batch, and its layer keep-mask [L, B_local].

    Seeded by (seed, step) alone, so a resumed run sees exactly the batches it would have seen.
    """
    cfg = run.cfg
    rng = np.random.default_rng([cfg.seed, step])
    tokens, targets = batch(run.train_ids, cfg.seq_len, cfg.batch_size, rng)
    rates = torch.tensor(cfg.recipe.dropout_rates(run.model.config.num_hidden_layers))
    draws = torch.from_numpy(rng.random((len(rates), cfg.batch_size))).float()
    keep = draws >= rates[:, None]  # [L, B]
    share = slice(run.rank, None, run.world)
    return tokens[share].to(cfg.device), targets[share].to(cfg.device), keep[:, share].to(cfg.device)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(cfg: TrainConfig):
    if cfg.device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16)
    enabled = cfg.bf16 and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


# ---------------------------------------------------------------- training


def train_step(run: Run, step: int) -> dict[int, float]:
    cfg = run.cfg
    n_layers = run.model.config.num_hidden_layers
    tokens, targets, keep = step_batch(run, step)
    exits = cfg.recipe.exit_layers(step, cfg.steps, n_layers)
    weights = cfg.recipe.loss_weights(exits, n_layers)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)
    with autocast(cfg):
        loss, per_layer = run.loss_module(tokens, targets, keep, exits, weights)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    return {l: float(v) for l, v in per_layer.items()}


@torch.no_grad()
def evaluate_exits(run: Run) -> dict[int, float]:
    """Held-out loss of every layer's exited logits (no dropout), on fixed batches."""
    model, cfg = run.model, run.cfg
    model.eval()
    rng = np.random.default_rng([cfg.seed, 10**9])
    n_layers = model.config.num_hidden_layers
    totals = [0.0] * n_layers
    for _ in range(cfg.eval_batches):
        tokens, targets = batch(run.heldout_ids, min(cfg.seq_len, len(run.heldout_ids) - 2), 4, rng)
        tokens, targets = tokens.to(cfg.device), targets.to(cfg.device)
        with autocast(cfg):
            h = model.embed_tokens(tokens)
            cos, sin = model.rope(torch.arange(tokens.shape[1], device=tokens.device))
            for l, layer in enumerate(model.layers):
                h = layer(h, cos, sin, None)
                logits = model.exit_logits(h).float()
                totals[l] += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    model.train()
    return {l: totals[l] / cfg.eval_batches for l in range(n_layers)}


def save_state(run: Run) -> None:
    """Everything needed to resume, written atomically: a crash mid-write keeps the previous state."""
    state = {"step": run.step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "config": run.cfg.to_dict(), "log": run.log, "elapsed_s": run.elapsed_s}
    try:
        atomic_write(Path(run.cfg.out) / STATE_FILE, lambda p: torch.save(state, p))
    except OSError as e:
        raise UserError(f"could not write the checkpoint to '{run.cfg.out}' ({e.strerror}); free disk space "
                        f"and rerun the same command to resume from the last checkpoint.") from None


def load_state(run: Run) -> None:
    path = Path(run.cfg.out) / STATE_FILE
    if run.cfg.restart or not path.exists():
        return
    try:
        state = torch.load(path, map_location=run.cfg.device, weights_only=False)
    except Exception as e:
        raise UserError(f"training state '{path}' is unreadable ({e}); delete it or pass --restart.") from None
    saved, now = dict(state["config"]), run.cfg.to_dict()
    for ignored in ("restart", "threads", "checkpoint_every", "eval_every", "device"):
        saved.pop(ignored, None), now.pop(ignored, None)
    if saved != now:
        changed = sorted(k for k in now if saved.get(k) != now[k])
        raise UserError(f"'{path}' was written with other settings ({', '.join(changed)}); rerun with the "
                        f"same flags to resume, or pass --restart to start over.")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.log, run.elapsed_s = state["step"], state["log"], state["elapsed_s"]


def train(cfg: TrainConfig) -> Path:
    run, tokenizer = setup(cfg)
    if run.rank == 0:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    load_state(run)
    train_loop(run)
    if run.rank == 0:
        finish(run, tokenizer)
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return Path(cfg.out)


def train_loop(run: Run) -> None:
    """Steps from run.step to cfg.steps, with progress, periodic held-out evaluation and checkpoints."""
    cfg, main = run.cfg, run.rank == 0
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if main:
        print(f"model: {run.model.config.num_hidden_layers} layers, {run.model.config.num_parameters() / 1e6:.2f}M "
              f"parameters; corpus: {run.corpus['train_tokens']:,} training tokens; {cfg.steps} steps x "
              f"{tokens_per_step:,} tokens" + (f"; resuming at step {run.step}" if run.step else ""), file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not main, desc="train", dynamic_ncols=True)
    t_last = time.perf_counter()
    while run.step < cfg.steps:
        losses = train_step(run, run.step)
        run.step += 1
        now = time.perf_counter()
        run.elapsed_s, t_last = run.elapsed_s + now - t_last, now
        entry = {"step": run.step, "lr": learning_rate(cfg, run.step - 1), "train_loss": losses}
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            entry["heldout_loss"] = evaluate_exits(run)
        run.log.append(entry)
        bar.update(1)
        bar.set_postfix_str(f"tok/s {run.step * tokens_per_step / max(run.elapsed_s, 1e-9):,.0f} " + " ".join(
            f"L{l + 1}={v:.2f}" for l, v in sorted(losses.items())))
        if main and (run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps):
            save_state(run)
    bar.close()


def finish(run: Run, tokenizer) -> None:
    """Write the Hugging Face checkpoint, the log and the loss plot; print a summary."""
    cfg, out = run.cfg, Path(run.cfg.out)
    save_checkpoint(run.model.cpu(), out, run.bos_id, run.eos_ids)
    if cfg.init_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(cfg.init_from) / name).exists():
                shutil.copy(Path(cfg.init_from) / name, out / name)
    else:
        atomic_write(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))
        write_json(out / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
            "model_max_length": cfg.seq_len, "add_bos_token": False})
    final = run.log[-1].get("heldout_loss", {})
    write_json(out / "train_log.json", {"config": cfg.to_dict(), "corpus": run.corpus, "wall_time_s": run.elapsed_s,
                                        "parameters": run.model.config.num_parameters(), "final_heldout_loss": final,
                                        "log": run.log})
    plot_losses(run.log, out / "train_loss.png")
    print(f"done: {run.step} steps in {run.elapsed_s / 60:.1f} min; held-out loss per exit layer: " +
          ", ".join(f"L{l + 1}={v:.3f}" for l, v in sorted(final.items(), key=lambda kv: int(kv[0]))) +
          f"; checkpoint in {out}", file=sys.stderr)


def plot_losses(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    evals = [e for e in log if "heldout_loss" in e]
    layers = sorted({int(l) for e in evals for l in e["heldout_loss"]})
    for l in layers:
        ax.plot([e["step"] for e in evals], [e["heldout_loss"][l] for e in evals], label=f"exit after layer {l + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out cross-entropy")
    ax.set_title("LayerSkip training: held-out loss at each exit layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> TrainConfig:
    d = TrainConfig(out=Path("."))
    r = LayerSkipRecipe()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--init-from", type=Path, help="continue training a Hugging Face Llama checkpoint directory")
    g = p.add_argument_group("model shape (from scratch)")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size)
    g.add_argument("--dim", type=int, default=d.hidden_size)
    g.add_argument("--layers", type=int, default=d.num_hidden_layers)
    g.add_argument("--heads", type=int, default=d.num_attention_heads)
    g.add_argument("--kv-heads", type=int, default=d.num_key_value_heads)
    g.add_argument("--ffn-dim", type=int, default=d.intermediate_size)
    g.add_argument("--untied", action="store_true", help="separate LM head and embedding")
    g = p.add_argument_group("data and optimizer")
    g.add_argument("--corpus", type=Path, help="folder of .py files (default: this Python's standard library)")
    g.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.json (e.g. the shipped model's) instead of training one")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--no-bf16", action="store_true", help="train in float32")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--device", default=d.device, help="cpu or cuda")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--restart", action="store_true", help="ignore OUT/train_state.pt and start over")
    g = p.add_argument_group("LayerSkip recipe")
    g.add_argument("--layer-dropout", type=float, default=r.dropout_max, help="p_max, the last layer's rate")
    g.add_argument("--dropout-scale", default=r.dropout_scale, help="exp (2^x - 1), linear or uniform")
    g.add_argument("--curriculum", default=r.curriculum, help="early-exit layers: none (all), rotational, gradual")
    g.add_argument("--rotation-interval", type=int, default=r.rotation_interval)
    g.add_argument("--early-exit-scale", type=float, default=r.early_exit_scale)
    g.add_argument("--focus-exit", type=int, default=r.focus_exit,
                   help="the exit layer E you will deploy: its loss in every step (0: none)")
    g.add_argument("--focus-weight", type=float, default=r.focus_weight,
                   help="the focus exit's loss weight relative to the last layer's")
    g.add_argument("--exit-distill", type=float, default=r.exit_distill,
                   help="weight of the KL to the last layer's distribution in early exits' losses (0: the paper's)")
    g.add_argument("--no-layerskip", action="store_true", help="ablation: no layer dropout, no early-exit loss")
    a = p.parse_args(argv)
    recipe = LayerSkipRecipe.off() if a.no_layerskip else LayerSkipRecipe(
        dropout_max=a.layer_dropout, dropout_scale=a.dropout_scale, curriculum=a.curriculum,
        rotation_interval=a.rotation_interval, early_exit_scale=a.early_exit_scale,
        focus_exit=a.focus_exit, focus_weight=a.focus_weight, exit_distill=a.exit_distill)
    return TrainConfig(
        out=a.out, steps=a.steps, init_from=a.init_from, vocab_size=a.vocab_size, hidden_size=a.dim,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        intermediate_size=a.ffn_dim, tie_word_embeddings=not a.untied, corpus=a.corpus, tokenizer=a.tokenizer,
        seq_len=a.seq_len,
        batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
        grad_clip=a.grad_clip, seed=a.seed, bf16=not a.no_bf16, threads=a.threads, device=a.device,
        checkpoint_every=a.checkpoint_every, eval_every=a.eval_every, restart=a.restart, recipe=recipe)


def main(argv=None) -> int:
    try:
        return run_command(lambda: train(parse_args(argv)))
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
