"""The distillation training loop, on accelerate (so `accelerate launch` scales it to DDP, FSDP or DeepSpeed).

Each optimizer step consumes a global batch of `batch_size x processes x grad_accum` blocks in a
seeded order that depends only on the step number, so a resumed run sees exactly the data an
uninterrupted run would. Checkpoints (model or adapter, optimizer, scheduler, RNG, step) are
written to a temporary folder and renamed, so a crash never leaves a half checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from slimlm.artifacts import atomic_write, temporary_beside
from slimlm.errors import StageFailed


@dataclass
class TrainPlan:
    steps: int
    batch_size: int  # per process, per micro-step
    grad_accum: int
    lr: float
    schedule: str
    warmup_fraction: float
    max_grad_norm: float | None
    checkpoint_every: int
    seed: int


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def rows_for_step(blocks: int, step: int, micro: int, plan: TrainPlan, rank: int, world: int) -> torch.Tensor:
    """Which of the `blocks` rows make up the batch of (step, micro-step, process): a seeded permutation per epoch."""
    start = (step * plan.grad_accum + micro) * plan.batch_size * world + rank * plan.batch_size
    orders: dict[int, torch.Tensor] = {}
    rows = []
    for offset in range(start, start + plan.batch_size):
        epoch, index = divmod(offset, blocks)
        if epoch not in orders:
            orders[epoch] = torch.randperm(blocks, generator=torch.Generator().manual_seed(plan.seed + epoch))
        rows.append(orders[epoch][index])
    return torch.stack(rows)


def lr_lambda(plan: TrainPlan) -> Callable[[int], float]:
    warmup = int(plan.steps * plan.warmup_fraction)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if plan.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, plan.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if plan.schedule == "cosine" else max(0.0, 1 - progress)

    return factor


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step-*") if (p / "progress.json").is_file())
    return done[-1] if done else None


def train(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    blocks: torch.Tensor,
    plan: TrainPlan,
    accelerator: Accelerator,
    checkpoints: Path,
    progress=None,
) -> TrainLog:
    """Optimise `module` (student plus any projections) for plan.steps optimizer steps; resume if possible.

    `loss_fn(module, ids, rows)` gets the batch's token ids and which rows of `blocks` they are."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(plan))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    def keep_trainable(models, weights, output_dir):  # a LoRA checkpoint holds the adapter, not the frozen base
        for state in weights:
            for key in [k for k in state if k.removeprefix("module.") not in trainable]:
                del state[key]

    accelerator.register_save_state_pre_hook(keep_trainable)
    log = TrainLog()
    start = 0
    last = latest_checkpoint(checkpoints)
    if last is not None:
        accelerator.load_state(str(last), strict=False)  # frozen weights come from the input model, not the checkpoint
        saved = json.loads((last / "progress.json").read_text())
        start, log.losses, log.tokens = saved["step"], saved["losses"], saved["tokens"]
        log.resumed_from = start
    module.train()
    rank, world = accelerator.process_index, accelerator.num_processes
    t0 = time.perf_counter()
    steps = range(start, plan.steps)
    for step in progress(steps, "distill", total=len(steps)) if progress else steps:
        total = 0.0
        for micro in range(plan.grad_accum):
            rows = rows_for_step(len(blocks), step, micro, plan, rank, world)
            ids = blocks[rows].to(accelerator.device)
            sync = micro == plan.grad_accum - 1
            with accelerator.no_sync(module) if not sync and world > 1 else contextlib.nullcontext():
                with accelerator.autocast():
                    loss = loss_fn(module, ids, rows) / plan.grad_accum
                accelerator.backward(loss)
            total += loss.detach()
            log.tokens += ids.numel() * world
        mean_loss = accelerator.reduce(total, reduction="mean").item() if world > 1 else float(total)
        if not math.isfinite(mean_loss):
            kept = latest_checkpoint(checkpoints)
            raise StageFailed(
                f"the distillation loss became {mean_loss} at step {step + 1}; "
                + (
                    f"the last good checkpoint ({kept.name}) is kept and a re-run resumes from it"
                    if kept
                    else "no checkpoint was written yet"
                )
                + "; lower the learning rate or enable gradient clipping (max_grad_norm)"
            )
        if plan.max_grad_norm:
            accelerator.clip_grad_norm_(params, plan.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        log.losses.append(round(mean_loss, 6))
        if plan.checkpoint_every and (step + 1) % plan.checkpoint_every == 0 and step + 1 < plan.steps:
            save_checkpoint(accelerator, checkpoints, step + 1, log)
    log.seconds = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    return log


def save_checkpoint(accelerator: Accelerator, checkpoints: Path, step: int, log: TrainLog) -> None:
    final = checkpoints / f"step-{step:08d}"
    main = accelerator.is_main_process
    # every process writes its part of the state into one folder; the main one renames it when all are done
    with atomic_write(final) if main else contextlib.nullcontext(temporary_beside(final)) as tmp:
        accelerator.wait_for_everyone()  # the main process has cleared what a killed attempt left
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": log.losses, "tokens": log.tokens}))
    if main:
        for old in checkpoints.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
