"""`kind: bitsandbytes` — 8-bit (LLM.int8) or 4-bit (NF4/FP4) weights for GPU serving, saved as a HF directory.

The output carries `quantization_config`, so `from_pretrained` alone reloads it. Linear layers
with an input or output width that is not a multiple of 32 stay in full precision
(`llm_int8_skip_modules`): bitsandbytes' CPU kernels fail on such widths (4-bit asserts on CPUs
with AVX512-BF16; 8-bit mis-shapes its scales), and keeping them out makes the artifact load and
run on any host, with nothing to patch after loading.
"""

from __future__ import annotations

import torch

from slimlm.quantize.config import BitsAndBytesStageConfig
from slimlm.sources.models import load_tokenizer, save_model
from slimlm.stage import StageContext, StageResult

KERNEL_MULTIPLE = 32


def odd_width_modules(path, trust_remote_code: bool = False) -> list[str]:
    """Linear layers (by module name) whose widths the bitsandbytes CPU kernels do not accept (read off the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # shapes only: no weights are loaded
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (m.out_features % KERNEL_MULTIPLE or m.in_features % KERNEL_MULTIPLE)
    ]


def four_bit_config(skip: list[str], quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.bfloat16):
    """transformers' 4-bit `BitsAndBytesConfig`, with the layers bitsandbytes' kernels cannot take left out."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def run(config: BitsAndBytesStageConfig, context: StageContext) -> StageResult:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    trust = context.trust_remote_code
    skip = odd_width_modules(context.input_dir, trust) + ["lm_head"]
    if config.bits == 8:
        quantization = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    else:
        quantization = four_bit_config(
            skip, config.quant_type, config.double_quant, compute_dtype=getattr(torch, config.compute_dtype)
        )
    model = AutoModelForCausalLM.from_pretrained(
        context.input_dir, quantization_config=quantization, device_map=context.device, trust_remote_code=trust
    )
    save_model(model, load_tokenizer(context.input_dir, trust_remote_code=trust), context.output_dir / "model")
    return StageResult(artifact="model", metrics={"kept_in_full_precision": skip})
