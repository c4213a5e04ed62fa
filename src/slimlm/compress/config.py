"""The `kind: prune` recipe section: the target size, how width and depth are scored, and the search."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimlm.stage import StageConfig, Strict

DepthMethod = Literal["block_importance", "perplexity", "contiguous"]

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

    @property
    def width_rounding(self) -> int | None:
        """The multiple this stage rounds hidden and MLP widths to, or None when it leaves them as they are
        (depth only, or width axes without hidden and mlp)."""
        t = self.target
        if t.params is not None or t.nonembedding_params is not None:
            return self.round_to if {"hidden", "mlp"} & set(self.width.axes) else None
        return self.round_to if t.hidden is not None or t.ffn is not None else None

    @model_validator(mode="after")
    def _offload_needs_activations(self) -> PruneConfig:
        if self.offload and self.width.method == "magnitude":
            raise ValueError("offload streams activations, not weights: use width.method activation (or random)")
        return self

    def data_references(self) -> dict[str, str]:
        return {"calibration": self.calibration}
