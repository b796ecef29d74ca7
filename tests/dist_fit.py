"""Train a saved tiny Q-Former a few steps on fixed global batches, each rank on its slice; rank 0 saves the
parameters. Run by tests/test_pretrain.py in one process and under `torchrun --nproc_per_node 2`."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from capfilt.settings import OptimConfig
from capfilt.train.parts import load_parts
from capfilt.train.pretrain import fit

GLOBAL_BATCH = 8
STEPS = 3


def global_batches(parts, steps: int) -> list[dict]:
    from capfilt.data.synth import COLOURS, SHAPES

    generator = torch.Generator().manual_seed(0)
    words = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    batches = []
    for _ in range(steps):
        pick = torch.randint(len(words), (GLOBAL_BATCH,), generator=generator).tolist()
        tokens = parts.tokenizer([words[i] for i in pick], padding="max_length", max_length=12, return_tensors="pt")
        batches.append(dict(pixel_values=torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator),
                            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                            sample_ids=torch.tensor(pick)))
    return batches


def train(run_dir: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    parts = load_parts(run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    rows = GLOBAL_BATCH // world
    mine = [{k: v[rank * rows : (rank + 1) * rows] for k, v in b.items()} for b in global_batches(parts, STEPS)]
    fit(parts.model, lambda start: iter(mine[start:]), OptimConfig(steps=STEPS, lr=1e-3, warmup_steps=1),
        accelerator, log_every=1)
    if accelerator.is_main_process:
        torch.save({k: v for k, v in parts.model.state_dict().items()}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    train(sys.argv[1], sys.argv[2])
