"""`kind: prune` — Minitron-style structured pruning of width (heads, MLP, hidden) and depth (layers)."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from slimlm import arch
from slimlm.compress.importance import collect_importance, layer_removal_loss
from slimlm.compress.search import candidate_shapes, kl_to_teacher, lm_loss
from slimlm.compress.select import DepthMethod, choose_layers, magnitude_scores, random_scores, select_plan
from slimlm.compress.surgery import KeepPlan, Shape, predict_parameters, prune_checkpoint, prune_model
from slimlm.errors import RecipeError
from slimlm.progress import status, track
from slimlm.sources.models import (
    load_model,
    load_model_offloaded,
    load_model_owned,
    load_tokenizer,
    return_freed_memory_to_the_os,
    save_model,
)
from slimlm.stage import StageConfig, StageContext, StageResult, Strict

SIZE_FIELDS = ("hidden", "ffn", "heads", "kv_heads", "layers")


class PruneTarget(Strict):
    """Either a parameter budget (a fraction of the input model, or an absolute count) or explicit sizes."""

    params: float | None = Field(None, gt=0)
    nonembedding_params: float | None = Field(None, gt=0)
    hidden: int | None = Field(None, ge=1)
    ffn: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    kv_heads: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_kind(self) -> PruneTarget:
        budgets = [b for b in (self.params, self.nonembedding_params) if b is not None]
        sizes = [getattr(self, f) for f in SIZE_FIELDS if getattr(self, f) is not None]
        if len(budgets) > 1:
            raise ValueError("give one budget: params or nonembedding_params")
        if budgets and sizes:
            raise ValueError("give either a budget (params / nonembedding_params) or explicit sizes, not both")
        if not budgets and not sizes:
            raise ValueError("give a budget (params: 0.7) or explicit sizes (hidden, ffn, heads, kv_heads, layers)")
        return self


class WidthOptions(Strict):
    method: Literal["activation", "magnitude", "random"] = "activation"
    axes: list[Literal["heads", "mlp", "hidden"]] = ["heads", "mlp", "hidden"]
    sequence: Literal["mean", "l2"] = "mean"  # how activations are reduced over the sequence...
    batch: Literal["l2", "mean"] = "l2"  # ...and then over the batch (Minitron's best: mean, then L2)


class DepthOptions(Strict):
    method: DepthMethod = "block_importance"


class SearchOptions(Strict):
    candidates: int = Field(6, ge=1)
    proxy: Literal["kl", "perplexity"] = "kl"
    proxy_samples: int = Field(4, ge=1)
    tolerance: float = Field(0.05, gt=0, lt=1)


class PruneConfig(StageConfig):
    kind: Literal["prune"]
    calibration: str = "calibration"
    target: PruneTarget
    width: WidthOptions = WidthOptions()
    depth: DepthOptions | None = None  # lets a budget search drop layers; target.layers implies it
    search: SearchOptions = SearchOptions()
    round_to: int = Field(32, ge=1)
    batch_size: int = Field(4, ge=1)
    offload: Literal["disk", "cpu"] | None = Field(
        None,
        description="keep the decoder layers on disk (or, on a GPU host, in CPU memory) and stream each through "
        "the device when it runs, for models bigger than memory; the pruned model is written weight by weight",
    )

    metrics = frozenset({"importance_seconds", "calibration_tokens"})

    @model_validator(mode="after")
    def _offload_needs_activations(self) -> PruneConfig:
        if self.offload and self.width.method == "magnitude":
            raise ValueError("offload streams activations, not weights: use width.method activation (or random)")
        return self

    def data_references(self) -> dict[str, str]:
        return {"calibration": self.calibration}


def _field_error(config: PruneConfig, field: str, message: str) -> RecipeError:
    return RecipeError(f"stage '{config.name}', field '{field}': {message}")


def explicit_shape(config: PruneConfig, base: Shape) -> Shape:
    target = config.target
    shape = base.replace(**{f: getattr(target, f) for f in SIZE_FIELDS})
    for field in SIZE_FIELDS:
        if getattr(shape, field) > getattr(base, field):
            raise _field_error(
                config, f"target.{field}", f"{getattr(shape, field)} is larger than the model's {getattr(base, field)}"
            )
    if shape.heads % shape.kv_heads:
        raise _field_error(
            config,
            "target.heads",
            f"{shape.heads} query heads do not divide evenly into {shape.kv_heads} key/value groups",
        )
    if shape.hidden % shape.heads:
        raise _field_error(
            config,
            "target.hidden",
            f"{shape.hidden} is not a multiple of {shape.heads} heads, which transformers' Llama and Gemma configs "
            "require (the pruned model would not load); choose a hidden size or head count that divide",
        )
    if shape.heads // shape.kv_heads > base.heads // base.kv_heads:
        raise _field_error(
            config,
            "target.heads",
            f"{shape.heads} heads over {shape.kv_heads} groups needs more heads per group "
            f"than the model has ({base.heads // base.kv_heads})",
        )
    return shape


def run(config: PruneConfig, context: StageContext) -> StageResult:
    trust = context.recipe.trust_remote_code
    dtype = context.recipe.dtype
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
        raise _field_error(config, f"target.{kind}", f"{budget:,} is more than the model's {full:,} parameters")
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
        raise _field_error(
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
        dtype=context.recipe.dtype,
        device=context.device,
        trust_remote_code=context.recipe.trust_remote_code,
    )
