"""The `kind: distill` recipe section: the loss, LoRA, the budget and schedule, and how many processes train."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from slimlm.stage import StageConfig, Strict


class LossOptions(Strict):
    logits: Literal["forward_kl", "reverse_kl", "jsd", "none"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    jsd_beta: float = Field(0.5, gt=0, lt=1)
    top_k: int | None = Field(None, ge=1, description="compare on the teacher's top-k tokens only")
    ce_weight: float = Field(0.0, ge=0, description="weight of cross-entropy on the data's next tokens")
    hidden: Literal["cosine", "mse"] | None = None
    hidden_weight: float = Field(1.0, ge=0)
    cache_teacher: bool = Field(
        False,
        description="keep the teacher's top-k logits of each block on disk, so passes after the first skip the teacher",
    )
    chunk: int | None = Field(
        None,
        ge=1,
        description="positions whose logits are formed at once; by default as many as make 64M logits (256 MB in fp32)",
    )

    @model_validator(mode="after")
    def _some_loss(self) -> LossOptions:
        if self.logits == "none" and self.ce_weight == 0 and self.hidden is None:
            raise ValueError("the loss is empty: set logits, ce_weight or hidden")
        if self.cache_teacher and (self.top_k is None or self.logits == "none" or self.hidden is not None):
            raise ValueError(
                "cache_teacher keeps the teacher's top-k logits only: it needs a logit loss with top_k "
                "(e.g. top_k: 64) and no hidden-state loss"
            )
        return self


class LoraOptions(Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LaunchOptions(Strict):
    """Train in several processes: DDP over `processes` local ones, or an accelerate config (FSDP, DeepSpeed)."""

    processes: int = Field(1, ge=1, description="local processes for DDP (gloo on CPU, NCCL on GPUs)")
    config: str | None = Field(None, description="an accelerate config file, e.g. configs/accelerate/fsdp.yaml")

    @model_validator(mode="after")
    def _config_exists(self) -> LaunchOptions:
        if self.config is not None and not Path(self.config).is_file():
            raise ValueError(
                f"accelerate config {self.config} does not exist (paths are relative to the current directory; "
                "slimlm ships configs/accelerate/fsdp.yaml and deepspeed-zero3.yaml)"
            )
        return self

    @property
    def distributed(self) -> bool:
        return self.processes > 1 or self.config is not None


class DistillConfig(StageConfig):
    kind: Literal["distill"]
    data: str = "train"
    method: Literal["full", "lora", "qlora"] = "lora"  # qlora: LoRA on a 4-bit (NF4) base, merged into full precision
    # random: the input's shape with freshly initialised weights (the family's own init, seeded by the recipe's
    # seed), trained on the same data and budget: the from-scratch baseline that says whether pruning was worth it
    init: Literal["input", "random"] = "input"
    lora: LoraOptions = LoraOptions()
    loss: LossOptions = LossOptions()
    tokens: int | None = Field(None, ge=1, description="token budget (global); or give steps")
    steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    # bf16/fp16 autocast with fp32 master weights and optimizer state; auto: bf16 where the device computes it
    # (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else fp32. The manifest records what was used.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="the teacher's weights: by default bf16/fp16 under that mixed precision, else the recipe's dtype",
    )
    checkpoint_every: int = Field(50, ge=0, description="optimizer steps between checkpoints; 0 disables them")
    becomes_teacher: bool = Field(
        False, description="teacher correction: later stages use this output as their teacher"
    )
    launch: LaunchOptions = LaunchOptions()

    metrics = frozenset({"train_loss", "train_tokens", "tokens_per_second"})

    @model_validator(mode="after")
    def _budget(self) -> DistillConfig:
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("give exactly one budget: tokens or steps")
        return self

    @model_validator(mode="after")
    def _init_random_trains_every_weight(self) -> DistillConfig:
        if self.init == "random" and self.method != "full":
            raise ValueError(
                f"init: random trains fresh weights, and {self.method} on random weights trains almost none of them: "
                "use method: full"
            )
        return self

    @property
    def corrects_teacher(self) -> bool:
        return self.becomes_teacher

    def launch_options(self) -> LaunchOptions | None:
        return self.launch if self.launch.distributed else None

    @property
    def needs_teacher(self) -> bool:
        return self.loss.logits != "none" or self.loss.hidden is not None

    def data_references(self) -> dict[str, str]:
        return {"data": self.data}
