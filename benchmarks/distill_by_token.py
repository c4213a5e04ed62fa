"""Where pure KD loses to CE-only on stories260K: held-out loss of the two students, by target token.

    python benchmarks/distill_by_token.py [--tokens 2000000]    (after benchmarks/distill.py --models stories260K)

Reads the students benchmarks/distill.py trained at that budget. The held-out text is the TinyStories
file read as written: blank lines between paragraphs, and mojibake (UTF-8 read as Latin-1, "â€™") that
the tokenizer spells in byte tokens. The teacher never learned either, so a KD student, which can only
copy the teacher, cannot learn them, while a CE student learns them from the train split. The table
lists the target tokens that make up most of the difference, and the perplexity of every model on
the other tokens.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, SHARED, write_results

from slimlm.sources.models import load_model, load_tokenizer
from slimlm.sources.specs import DataSpec
from slimlm.sources.text import load_documents, pack_tokens, token_stream

TEACHER = SHARED / "models" / "stories260K"
TEXT = SHARED / "data" / "tinystories" / "tinystories_val.txt"


@torch.inference_mode()
def target_nll(model, blocks: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every next token, flattened as blocks[:, 1:] is."""
    out = []
    for batch in blocks.split(8):
        logp = F.log_softmax(model(input_ids=batch).logits.float(), -1)[:, :-1]
        out.append(-logp.gather(-1, batch[:, 1:, None])[..., 0])
    return torch.cat(out).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_000_000, help="the budget whose students to compare")
    parser.add_argument("--out", type=Path, default=RESULTS / "distill_by_token.json")
    args = parser.parse_args()
    runs = RESULTS / "runs" / "stories260K"
    paths = {"teacher": TEACHER, **{k: runs / f"{k}-{args.tokens}" / "02-distill" / "model" for k in ("kd", "ce")}}
    if not all(p.is_dir() for p in paths.values()):
        raise SystemExit(
            f"missing {[str(p) for p in paths.values() if not p.is_dir()]}: run benchmarks/distill.py first"
        )
    tok = load_tokenizer(TEACHER)
    # the held-out text as benchmarks/distill.py scores it
    blocks = pack_tokens(token_stream(load_documents(DataSpec(source=str(TEXT), split="test")), tok, 16384), 256)
    nll = {k: target_nll(load_model(p), blocks) for k, p in paths.items()}
    targets = blocks[:, 1:].flatten()
    excess = nll["kd"] - nll["ce"]
    by_token: dict[int, float] = defaultdict(float)
    for t, d in zip(targets.tolist(), excess.tolist(), strict=True):
        by_token[t] += d
    total = excess.sum().item()
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    rows = []
    print(
        f"KD's held-out loss exceeds CE's by {total / targets.numel():.4f} nats/token; the tokens behind most of it:\n"
    )
    print("| target token | count | share of the excess | teacher nll | KD nll | CE nll |")
    print("|---|---|---|---|---|---|")
    for t, d in sorted(by_token.items(), key=lambda x: -x[1])[:8]:
        at = targets == t
        row = {"token": pieces[t], "count": int(at.sum()), "share": d / total}
        row |= {f"{k}_nll": nll[k][at].mean().item() for k in nll}
        rows.append(row)
        print(
            f"| {row['token']!r} | {row['count']} | {row['share']:.0%} | {row['teacher_nll']:.2f} | "
            f"{row['kd_nll']:.2f} | {row['ce_nll']:.2f} |"
        )
    # Line breaks and byte tokens (mojibake): the file's formatting, which the teacher never saw.
    formatting = torch.tensor([p.startswith("<0x") or any(c in p for c in "â€™") for p in pieces])[targets]
    ppl = {
        k: {"all": v.mean().exp().item(), "other_tokens": v[~formatting].mean().exp().item()} for k, v in nll.items()
    }
    print(f"\nperplexity on all {targets.numel()} targets, and on the {int((~formatting).sum())} that are not line")
    print("breaks or byte tokens:\n")
    print("| model | all | other tokens |")
    print("|---|---|---|")
    for k, v in ppl.items():
        print(f"| {k} | {v['all']:.3f} | {v['other_tokens']:.3f} |")
    write_results(
        args.out,
        {"tokens": args.tokens, "excess_nats_per_token": total / targets.numel(), "rows": rows, "perplexity": ppl},
    )


if __name__ == "__main__":
    main()
