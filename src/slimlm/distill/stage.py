"""`kind: distill` — train the previous stage's model (the student) to match the teacher.

Full fine-tuning, or LoRA through peft (merged into the weights at the end, so the output is a
plain HF directory). Logit losses (forward/reverse KL, JSD), optional cross-entropy, optional
hidden-state loss with learned projections when widths differ (objective.py), in fp32 or under
bf16 autocast (precision.py), optionally with the teacher's top-k logits cached on disk.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from slimlm import arch
from slimlm.distill.config import DistillConfig
from slimlm.distill.losses import layer_mapping
from slimlm.distill.objective import Student, TeacherStates
from slimlm.distill.precision import resolve_mixed_precision, resolve_teacher_dtype
from slimlm.distill.train import TrainPlan, train
from slimlm.errors import SourceError
from slimlm.progress import status, track
from slimlm.sources.models import fresh_model, load_model, load_tokenizer, save_model
from slimlm.stage import StageContext, StageResult, field_error


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
    precision = resolve_mixed_precision(config.mixed_precision, context.device)
    teacher_dtype = resolve_teacher_dtype(config.teacher_dtype, precision, context.dtype)
    # accelerate keeps one state per process, fixed by the first Accelerator: a run whose distill stages train in
    # different precisions (an fp32 teacher correction, then bf16 distillation) needs it reset. The process group,
    # held by PartialState, is kept.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=precision, cpu=context.device == "cpu")
    if config.init == "random":  # the from-scratch baseline: the input's shape, not its weights
        student = fresh_model(context.input_dir, seed=context.seed, trust_remote_code=trust)
    elif config.method == "qlora":
        student = _load_4bit(context.input_dir, context.device, trust)
    else:
        student = load_model(context.input_dir, dtype="float32", device="cpu", trust_remote_code=trust)
    teacher = None
    vocab = student.config.vocab_size
    if config.needs_teacher:  # cross-entropy alone (e.g. teacher correction) trains without one
        teacher = load_model(
            context.teacher_dir,
            dtype=teacher_dtype,
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
    bf16_base = config.method == "lora" and precision == "bf16"
    if bf16_base:
        _frozen_linears_to_bf16(student)
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
    module = Student(student, config.loss, vocab, projections, mapping)
    teacher_layers = [j for _, j in mapping]
    cache = _teacher_cache(config, context, blocks, steps * tokens_per_step, vocab) if teacher is not None else None

    def loss_fn(m: Student, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if teacher is None:
            return m(ids, None)
        if cache is None:
            return m(ids, TeacherStates.of(teacher, ids, teacher_layers))
        top = cache.lookup(rows)
        if top is None:
            states = TeacherStates.top_k_of(teacher, ids, config.loss.top_k, vocab, module.chunk)
            cache.store(rows, *states.top)
            return m(ids, states)
        return m(ids, TeacherStates(None, None, [], tuple(t.to(ids.device) for t in top)))

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
        f"{steps} optimizer steps of {tokens_per_step:,} tokens ({config.method}, "
        f"{'fp32' if precision == 'no' else precision + ' autocast'}, teacher in {teacher_dtype if teacher else 'none'}); "
        f"checkpoints in {context.work_dir}"
    )
    log = train(module, loss_fn, blocks, plan, accelerator, context.work_dir, progress=track)
    if log.resumed_from:
        status(f"resumed from the checkpoint at step {log.resumed_from}")
    if cache is not None:
        status(f"teacher top-{config.loss.top_k}: {cache.hits} batches read from the cache, {cache.misses} computed")
    unwrapped = accelerator.unwrap_model(module)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):  # sharded: gather the full weights first
        unwrapped.load_state_dict(accelerator.get_state_dict(module), strict=False)
    trained = unwrapped.model
    if config.method == "lora" and not bf16_base:
        trained = trained.merge_and_unload()
    elif config.method != "full":  # merge the adapter into the full-precision weights, not the 4-bit or bf16 ones
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
            "mixed_precision": precision,
            **({"teacher_cache": {"read": cache.hits, "computed": cache.misses}} if cache is not None else {}),
            "teacher_dtype": teacher_dtype if teacher is not None else None,
        },
    )


def _teacher_cache(config: DistillConfig, context: StageContext, blocks: torch.Tensor, tokens: int, vocab: int):
    """The on-disk store of the teacher's top-k logits (loss.cache_teacher), after checking it fits the disk."""
    from slimlm.distill.teacher_cache import TeacherTopK, cache_bytes, free_bytes

    k = config.loss.top_k
    if k is not None and k > vocab:
        raise field_error(config, "loss.top_k", f"top_k {k} is more than the vocabulary's {vocab:,} tokens")
    if not config.loss.cache_teacher:
        return None
    folder = context.work_dir / "teacher"
    seen = min(len(blocks), -(-tokens // blocks.shape[1]))  # blocks the run visits; the rest stay sparse
    need, free = cache_bytes(seen, blocks.shape[1], k), free_bytes(folder)
    if need > free:
        raise field_error(
            config,
            "loss.cache_teacher",
            f"the teacher's top-{k} logits of {seen:,} blocks take {need / 2**30:.1f} GiB and the disk under "
            f"{context.work_dir} has {free / 2**30:.1f} GiB free; lower top_k or turn the cache off",
        )
    return TeacherTopK(folder, len(blocks), blocks.shape[1], k)


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


def _frozen_linears_to_bf16(model) -> None:
    """Store LoRA's frozen base matrices in bf16, as autocast would cast them before every matmul anyway.

    autocast caches the bf16 copy of a trainable weight for a step but casts a frozen one again at every
    call; cast once, the forward computes the same values without that pass over the weights. Embeddings
    and norms stay in fp32, so the residual stream does too.
    """
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and "lora_" not in name:
            if module is model.get_output_embeddings():
                continue  # the head may be the embedding table itself
            module.to(torch.bfloat16)


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
