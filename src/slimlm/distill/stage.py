"""`kind: distill` — train the previous stage's model (the student) to match the teacher.

Full fine-tuning, or LoRA through peft (merged into the weights at the end, so the output is a
plain HF directory). Logit losses (forward/reverse KL, JSD), optional cross-entropy, optional
hidden-state loss with learned projections when widths differ.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from slimlm import arch
from slimlm.distill.config import DistillConfig
from slimlm.distill.losses import LOGIT_LOSSES, hidden_state_loss, layer_mapping, top_k_teacher
from slimlm.distill.train import TrainPlan, train
from slimlm.errors import SourceError
from slimlm.progress import status, track
from slimlm.sources.models import load_model, load_tokenizer, save_model
from slimlm.stage import StageContext, StageResult, field_error


class Student(torch.nn.Module):
    """The student plus the projections that map its hidden states to the teacher's width.

    The forward pass goes through this module (not `.model`) so that DDP, FSDP or DeepSpeed,
    which wrap it, see every call and synchronise gradients.
    """

    def __init__(self, model, projections: torch.nn.ModuleList | None, layers: list[int]):
        super().__init__()
        self.model, self.projections, self.layers = model, projections, layers

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits, and the chosen layers' hidden states projected to the teacher's width."""
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=bool(self.layers))
        hidden = [self.projections[k](out.hidden_states[i + 1]) for k, i in enumerate(self.layers)]
        return out.logits, hidden


def check_tokenizers(student_tok, teacher_tok) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise SourceError(
            "the student's and the teacher's tokenizers differ, so their logits cannot be compared; "
            "distill only into a model derived from the teacher (or one with the same tokenizer)"
        )


def run(config: DistillConfig, context: StageContext) -> StageResult:
    trust = context.trust_remote_code
    tokenizer = load_tokenizer(context.input_dir, trust_remote_code=trust)
    check_tokenizers(tokenizer, load_tokenizer(context.teacher_dir, trust_remote_code=trust))
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=context.device == "cpu")
    student = (
        _load_4bit(context.input_dir, context.device, trust)
        if config.method == "qlora"
        else load_model(context.input_dir, dtype="float32", device="cpu", trust_remote_code=trust)
    )
    teacher = None
    vocab = student.config.vocab_size
    if config.needs_teacher:  # cross-entropy alone (e.g. teacher correction) trains without one
        teacher = load_model(
            context.teacher_dir,
            dtype=config.teacher_dtype or context.dtype,
            device=str(accelerator.device),
            trust_remote_code=trust,
        )
        teacher.requires_grad_(False)
        vocab = min(student.config.vocab_size, teacher.config.vocab_size)  # vocabularies may differ by padding only

    blocks = context.data.blocks(config.data, tokenizer, bos_per_window=arch.needs_bos_per_window(student.config))
    world = accelerator.num_processes
    tokens_per_step = config.batch_size * world * config.grad_accum * blocks.shape[1]
    if config.tokens is not None and config.tokens < tokens_per_step:
        raise field_error(
            config,
            "tokens",
            f"{config.tokens:,} tokens is less than one optimizer step "
            f"({tokens_per_step:,} = batch_size x processes x grad_accum x seq_len)",
        )
    steps = config.steps or config.tokens // tokens_per_step

    if config.method in ("lora", "qlora"):
        student = _with_lora(student, config)
    projections, mapping = None, []
    if config.loss.hidden:
        mapping = layer_mapping(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        s_width, t_width = student.config.hidden_size, teacher.config.hidden_size
        projections = torch.nn.ModuleList(
            [
                torch.nn.Identity() if s_width == t_width else torch.nn.Linear(s_width, t_width, bias=False)
                for _ in mapping
            ]
        )
    module = Student(student, projections, [i for i, _ in mapping])
    loss = config.loss

    def loss_fn(m: Student, ids: torch.Tensor) -> torch.Tensor:
        s_logits, s_hidden = m(ids)
        s_logits = s_logits[..., :vocab]
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=bool(mapping))
            t_logits = t_out.logits[..., :vocab]
        total = torch.zeros((), device=ids.device)
        if loss.logits != "none":
            s_flat, t_flat = s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab)
            if loss.top_k:
                s_flat, t_flat = top_k_teacher(s_flat, t_flat, loss.top_k)
            fn = LOGIT_LOSSES[loss.logits]
            kwargs = {"beta": loss.jsd_beta} if loss.logits == "jsd" else {}
            total = total + fn(s_flat, t_flat, loss.temperature, **kwargs)
        if loss.ce_weight:
            total = total + loss.ce_weight * torch.nn.functional.cross_entropy(
                s_logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1)
            )
        if mapping:
            pairs = [(s, t_out.hidden_states[j + 1]) for s, (_, j) in zip(s_hidden, mapping, strict=True)]
            total = total + loss.hidden_weight * sum(hidden_state_loss(s, t, loss.hidden) for s, t in pairs) / len(
                pairs
            )
        return total

    plan = TrainPlan(
        steps=steps,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        lr=config.lr,
        schedule=config.schedule,
        warmup_fraction=config.warmup,
        max_grad_norm=config.max_grad_norm,
        checkpoint_every=config.checkpoint_every,
        seed=context.seed,
    )
    status(
        f"{steps} optimizer steps of {tokens_per_step:,} tokens ({config.method}); checkpoints in {context.work_dir}"
    )
    log = train(module, loss_fn, blocks, plan, accelerator, context.work_dir, progress=track)
    if log.resumed_from:
        status(f"resumed from the checkpoint at step {log.resumed_from}")
    unwrapped = accelerator.unwrap_model(module)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):  # sharded: gather the full weights first
        unwrapped.load_state_dict(accelerator.get_state_dict(module), strict=False)
    trained = unwrapped.model
    if config.method == "lora":
        trained = trained.merge_and_unload()
    elif config.method == "qlora":  # merge the adapter into the full-precision weights, not the 4-bit ones
        trained = _merge_into_full_precision(trained, context.input_dir, config, trust)
    if accelerator.is_main_process:
        save_model(trained.to(getattr(torch, context.dtype)), tokenizer, context.output_dir / "model")
    new_tokens = log.tokens - log.resumed_from * tokens_per_step
    tail = log.losses[-10:]
    return StageResult(
        artifact="model",
        metrics={
            "train_loss": sum(tail) / len(tail),
            "train_tokens": log.tokens,
            "train_steps": steps,
            "tokens_per_second": new_tokens / log.seconds if log.seconds else None,
            "loss_curve": log.losses[:: max(1, len(log.losses) // 100)],
            "resumed_from_step": log.resumed_from,
        },
    )


def _load_4bit(path, device: str, trust: bool):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from slimlm.quantize.bnb import four_bit_config, odd_width_modules

    quantization = four_bit_config(
        odd_width_modules(path, trust) + ["lm_head"],
        compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map=device, trust_remote_code=trust
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _merge_into_full_precision(trained, path, config: DistillConfig, trust: bool):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = get_peft_model_state_dict(trained)
    full = _with_lora(load_model(path, dtype="float32", trust_remote_code=trust), config)
    set_peft_model_state_dict(full, adapter)
    return full.merge_and_unload()


def _with_lora(model, config: DistillConfig):
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in config.lora.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise field_error(
            config, "lora.target_modules", f"{missing} not found in the model; its linear layers are {linear}"
        )
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
