"""Run under torchrun by test_training.py: train a few DDP steps, then save this rank's weights."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from models.train import parse_args, setup, train_loop

if __name__ == "__main__":
    cfg = parse_args(sys.argv[1:])
    run, _ = setup(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if run.rank == 0:
        torch.save(run.model.state_dict(), out / "rank0_initial.pt")
    train_loop(run)
    torch.save(run.model.state_dict(), out / f"rank{run.rank}_weights.pt")
    dist.barrier()
    dist.destroy_process_group()
