"""Peak memory of the KD loss (forward and backward) against vocabulary size: the whole batch's logits vs chunks.

    python benchmarks/kd_memory.py [--vocab 32000 128000 256000] [--tokens 2048] [--chunks 1024 256]

Each measurement runs in a fresh process on a tiny Llama built from config (hidden 64, 2 layers, tied
embeddings), so the logits dominate: the figure is the rise of the process's peak RSS from just before
the loss to just after its backward pass. "whole batch" is the loss as the distill stage computed it
before chunking (both models' full logits, then forward KL); "chunk N" is the stage's loss now, and
"default chunk" the stage's loss with its default chunk (as many positions as make 2^26 logits).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import RESULTS, write_results

PROBE = """
import json, resource, sys, torch, transformers
from slimlm.distill.config import LossOptions
from slimlm.distill.losses import forward_kl
from slimlm.distill.objective import Student, TeacherStates
vocab, tokens, chunk = (int(a) for a in sys.argv[1:4])
def tiny(seed):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.AutoModelForCausalLM.from_config(config)
teacher, student = tiny(0).requires_grad_(False), tiny(1)
ids = torch.randint(0, vocab, (1, tokens))
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
if chunk == 0:  # the whole batch; chunk -1: the stage's default chunk
    s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits
    loss = forward_kl(s.reshape(-1, vocab), t.reshape(-1, vocab))
else:
    loss = Student(student, LossOptions(chunk=chunk if chunk > 0 else None), vocab)(ids, TeacherStates.of(teacher, ids, []))
loss.backward()
print(json.dumps({"loss": loss.item(), "peak_rise_bytes": peak() - before}))
"""


def measure(vocab: int, tokens: int, chunk: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(vocab), str(tokens), str(chunk)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"probe failed (vocab {vocab}, chunk {chunk}): {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", nargs="*", type=int, default=[32_000, 128_000, 256_000])
    parser.add_argument("--tokens", type=int, default=2048, help="positions in the batch (one sequence)")
    parser.add_argument("--chunks", nargs="*", type=int, default=[-1, 256], help="positions per chunk; -1: the default")
    parser.add_argument("--out", type=Path, default=RESULTS / "kd_memory.json")
    args = parser.parse_args()
    rows = []
    for vocab in args.vocab:
        whole = measure(vocab, args.tokens, 0)
        row = {"vocab": vocab, "tokens": args.tokens, "whole_batch_bytes": whole["peak_rise_bytes"], "chunks": {}}
        for chunk in args.chunks:
            got = measure(vocab, args.tokens, chunk)
            # the same models and ids (seeded): the chunked loss must agree with the whole-batch one
            assert abs(got["loss"] - whole["loss"]) < 1e-4 * max(1.0, abs(whole["loss"])), (got, whole)
            row["chunks"][chunk] = got["peak_rise_bytes"]
        rows.append(row)
        print(f"vocab {vocab:,}: done", file=sys.stderr, flush=True)
    mib = 2**20
    print(f"\n## KD loss peak memory (forward + backward), {args.tokens:,} positions, fp32\n")
    names = [f"chunk {c}" if c > 0 else "default chunk (2^26 logits)" for c in args.chunks]
    print("| vocabulary | one fp32 logits copy | whole batch | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(args.chunks))
    for row in rows:
        copy = row["tokens"] * row["vocab"] * 4
        cells = " | ".join(
            f"{row['chunks'][c] / mib:,.0f} MiB ({row['whole_batch_bytes'] / max(row['chunks'][c], 1):.1f}x less)"
            for c in args.chunks
        )
        print(f"| {row['vocab']:,} | {copy / mib:,.0f} MiB | {row['whole_batch_bytes'] / mib:,.0f} MiB | {cells} |")
    write_results(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
