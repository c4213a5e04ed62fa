"""`kind: prune` — Minitron-style structured pruning of width (heads, MLP, hidden) and depth (layers)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable

import torch

from slimlm import arch
from slimlm.compress.config import SIZE_FIELDS, PruneConfig
from slimlm.compress.importance import collect_importance, layer_removal_loss
from slimlm.compress.search import candidate_shapes, kl_to_teacher, lm_loss
from slimlm.compress.select import choose_layers, magnitude_scores, random_scores, select_plan
from slimlm.compress.surgery import KeepPlan, Shape, predict_parameters, prune_checkpoint, prune_model
from slimlm.progress import status, track
from slimlm.sources.models import (
    load_model,
    load_model_offloaded,
    load_model_owned,
    load_tokenizer,
    return_freed_memory_to_the_os,
    save_model,
)
from slimlm.stage import StageContext, StageResult, field_error


def explicit_shape(config: PruneConfig, base: Shape) -> Shape:
    target = config.target
    shape = base.replace(**{f: getattr(target, f) for f in SIZE_FIELDS})
    for field in SIZE_FIELDS:
        if getattr(shape, field) > getattr(base, field):
            raise field_error(
                config, f"target.{field}", f"{getattr(shape, field)} is larger than the model's {getattr(base, field)}"
            )
    if shape.heads % shape.kv_heads:
        raise field_error(
            config,
            "target.heads",
            f"{shape.heads} query heads do not divide evenly into {shape.kv_heads} key/value groups",
        )
    if shape.hidden % shape.heads:
        raise field_error(
            config,
            "target.hidden",
            f"{shape.hidden} is not a multiple of {shape.heads} heads, which transformers' Llama and Gemma configs "
            "require (the pruned model would not load); choose a hidden size or head count that divide",
        )
    if shape.heads // shape.kv_heads > base.heads // base.kv_heads:
        raise field_error(
            config,
            "target.heads",
            f"{shape.heads} heads over {shape.kv_heads} groups needs more heads per group "
            f"than the model has ({base.heads // base.kv_heads})",
        )
    return shape


def run(config: PruneConfig, context: StageContext) -> StageResult:
    trust = context.trust_remote_code
    dtype = context.dtype
    return_freed_memory_to_the_os()  # weights are loaded and dropped one at a time below; keep the peak honest
    if config.offload:
        model = load_model_offloaded(
            context.input_dir,
            context.work_dir / "offload",
            to=config.offload,
            dtype=dtype,
            device=context.device,
            trust_remote_code=trust,
        )
    else:  # owned (not memory-mapped) weights let the final prune release the source weight by weight
        load = load_model_owned if any(context.input_dir.glob("*.safetensors")) else load_model
        model = load(context.input_dir, dtype=dtype, device=context.device, trust_remote_code=trust)
    arch.family_of(model.config)
    tokenizer = load_tokenizer(context.input_dir, trust_remote_code=trust)
    base = Shape.of(model.config)
    shape = (
        explicit_shape(config, base)
        if config.target.params is None and config.target.nonembedding_params is None
        else None
    )
    blocks = context.data.blocks(config.calibration, tokenizer, bos_per_window=arch.needs_bos_per_window(model.config))

    t0 = time.perf_counter()
    plan_for = score(config, model, blocks, base, shape, context.seed)
    importance_seconds = time.perf_counter() - t0
    candidates = []
    if shape is None:
        shape, candidates = search(config, model, base, blocks, plan_for, context)

    plan = plan_for(shape)
    if config.offload:
        prune_checkpoint(context.input_dir, plan, shape, context.output_dir / "model", model.config, model.dtype)
        tokenizer.save_pretrained(context.output_dir / "model")
    else:
        pruned = prune_model(model, plan, shape, consume=True)  # releases the source weights as it goes
        save_model(pruned, tokenizer, context.output_dir / "model")
    status(f"pruned to {dataclasses.asdict(shape)}, keeping layers {plan.layers}")
    return StageResult(
        artifact="model",
        metrics={
            "shape": dataclasses.asdict(shape),
            "kept_layers": plan.layers,
            "candidates": candidates,
            "importance_seconds": round(importance_seconds, 3),
            "calibration_tokens": int(blocks.numel()),
            "proxy": config.search.proxy if candidates else None,
        },
    )


def score(
    config: PruneConfig, model, blocks: torch.Tensor, base: Shape, shape: Shape | None, seed: int
) -> Callable[[Shape], KeepPlan]:
    """Score channels and layers once; return a function from a target shape to the channels and layers kept."""
    depth_method = config.depth.method if config.depth else "block_importance"
    may_drop_layers = config.depth is not None or (shape is not None and shape.layers < base.layers)
    importance = None
    if config.width.method == "activation" or may_drop_layers:
        importance = collect_importance(
            model,
            blocks,
            sequence=config.width.sequence,
            batch=config.width.batch,
            batch_size=config.batch_size,
            progress=track,
        )
    if config.width.method == "activation":
        scores = {"heads": importance.heads, "mlp": importance.mlp, "hidden": importance.hidden}
    elif config.width.method == "magnitude":
        scores = magnitude_scores(model)
    else:
        scores = random_scores(model.config, seed)
    removal = None
    if may_drop_layers and depth_method == "perplexity":
        removal = layer_removal_loss(
            model, blocks[: config.search.proxy_samples], batch_size=config.batch_size, progress=track
        )
    model_config = model.config

    def plan_for(s: Shape) -> KeepPlan:
        kept = choose_layers(
            base.layers,
            s.layers,
            depth_method,
            block=importance.block if importance else None,
            angular=importance.angular if importance else None,
            removal_loss=removal,
        )
        return select_plan(model_config, s, kept, scores["heads"], scores["mlp"], scores["hidden"])

    return plan_for


def search(
    config: PruneConfig,
    model,
    base: Shape,
    blocks: torch.Tensor,
    plan_for: Callable[[Shape], KeepPlan],
    context: StageContext,
) -> tuple[Shape, list[dict]]:
    """The shapes that fit the budget, each pruned and ranked by the proxy; the best one wins."""
    kind = "params" if config.target.params is not None else "nonembedding_params"
    value = config.target.params or config.target.nonembedding_params
    full = predict_parameters(model, base)[kind]
    budget = round(value * full) if value <= 1 else round(value)
    if budget > full:
        raise field_error(config, f"target.{kind}", f"{budget:,} is more than the model's {full:,} parameters")
    found = candidate_shapes(
        base,
        axes=set(config.width.axes),
        depth=config.depth is not None,
        round_to=config.round_to,
        budget=budget,
        tolerance=config.search.tolerance,
        limit=config.search.candidates,
        count=lambda s: predict_parameters(model, s)[kind],
    )
    if not found:
        raise field_error(
            config,
            f"target.{kind}",
            f"no shape with widths in multiples of {config.round_to} fits {budget:,} parameters "
            f"(±{config.search.tolerance:.0%}); allow more axes or depth, lower round_to, or change the budget",
        )
    if len(found) == 1:
        shape, params = found[0]
        return shape, [{**dataclasses.asdict(shape), kind: params, "proxy": None}]
    proxy_blocks = blocks[: config.search.proxy_samples]
    teacher_logprobs = None
    if config.search.proxy == "kl":
        with torch.inference_mode():  # one block at a time: [seq, vocab] logits are the largest tensors here
            teacher_logprobs = torch.stack(
                [
                    torch.log_softmax(
                        model(input_ids=row[None].to(context.device), use_cache=False).logits[0].float(), -1
                    )
                    for row in proxy_blocks
                ]
            )
    candidates = []
    for s, params in track(found, "candidate shapes"):
        student = _candidate(config, model, plan_for(s), s, context)
        proxy = (
            kl_to_teacher(student, teacher_logprobs, proxy_blocks)
            if teacher_logprobs is not None
            else lm_loss(student, proxy_blocks)
        )
        del student
        candidates.append({**dataclasses.asdict(s), kind: params, "proxy": proxy})
        status(f"candidate {dataclasses.asdict(s)}: {kind}={params:,} proxy={proxy:.4g}")
    shutil.rmtree(context.work_dir / "candidate", ignore_errors=True)
    best = min(candidates, key=lambda c: c["proxy"])
    return Shape(**{f: best[f] for f in SIZE_FIELDS}), candidates


def _candidate(config: PruneConfig, model, plan: KeepPlan, shape: Shape, context: StageContext):
    """A candidate pruned model to score: in memory, or (offload) written to disk and streamed like the source."""
    if not config.offload:
        return prune_model(model, plan, shape)
    folder = context.work_dir / "candidate"
    shutil.rmtree(folder, ignore_errors=True)
    prune_checkpoint(context.input_dir, plan, shape, folder, model.config, model.dtype)
    return load_model_offloaded(
        folder,
        context.work_dir / "offload-candidate",
        to=config.offload,
        dtype=context.dtype,
        device=context.device,
        trust_remote_code=context.trust_remote_code,
    )
