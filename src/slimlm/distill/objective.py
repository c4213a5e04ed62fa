"""What the student is trained to minimise: logit KD and cross-entropy (a chunk of positions at a time) and
the hidden-state loss, computed from the student's and the teacher's decoder outputs.

Neither model's full [batch, sequence, vocabulary] logits are formed: both decoders stop at their last
hidden state and each LM head is applied per chunk inside `chunked_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm.distill.chunked import chunked_loss
from slimlm.distill.config import LossOptions
from slimlm.distill.losses import LOGIT_LOSSES, hidden_state_loss, top_k_teacher

CHUNK_LOGITS = 2**26  # logits per chunk by default: 256 MB in fp32, 1,365 positions at SmolLM2's 49k vocabulary
IGNORE = -100  # cross-entropy label of a block's last position, which has no next token in the block


def decoder_states(model, ids: torch.Tensor, layers: list[int]):
    """The decoder's output (final-normed last hidden state, and every layer's if `layers`), without the head."""
    return model.get_decoder()(input_ids=ids, use_cache=False, output_hidden_states=bool(layers))


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """What the model's forward would compute from `hidden`: the LM head, then Gemma's final soft-capping."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class TeacherStates:
    """What the loss needs of the teacher for one batch: its last hidden state (its head is applied per chunk) and
    the hidden states of the layers the student's are compared with; or only its top-k logits, read from a cache."""

    model: torch.nn.Module | None  # for its head, applied per chunk
    last: torch.Tensor | None  # [tokens, hidden]
    layers: list[torch.Tensor]
    top: tuple[torch.Tensor, torch.Tensor] | None = None  # top-k logits and their token ids, [tokens, k] each

    @classmethod
    def of(cls, teacher, ids: torch.Tensor, layers: list[int]) -> TeacherStates:
        with torch.no_grad():
            out = decoder_states(teacher, ids, layers)
        last = out.last_hidden_state
        return cls(teacher, last.reshape(-1, last.shape[-1]), [out.hidden_states[j + 1] for j in layers])

    @classmethod
    def top_k_of(cls, teacher, ids: torch.Tensor, k: int, vocab: int, chunk: int) -> TeacherStates:
        """The teacher's top-k logits per position, computed a chunk of positions at a time."""
        full = cls.of(teacher, ids, [])
        with torch.no_grad():
            tops = [
                head_logits(teacher, full.last[i : i + chunk])[:, :vocab].topk(k, dim=-1)
                for i in range(0, len(full.last), chunk)
            ]
        return cls(None, None, [], (torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])))

    def logits(self, rows: slice, vocab: int) -> torch.Tensor:
        with torch.no_grad():
            return head_logits(self.model, self.last[rows])[:, :vocab]


class Student(torch.nn.Module):
    """The student plus the projections that map its hidden states to the teacher's width; forward returns the loss.

    The whole loss is computed inside this module's forward (not after it) so that DDP, FSDP or DeepSpeed,
    which wrap it, see every use of the weights, the LM head's included, and synchronise their gradients.
    """

    def __init__(
        self,
        model,
        loss: LossOptions,
        vocab: int,
        projections: torch.nn.ModuleList | None = None,
        layers: list[tuple[int, int]] = (),
    ):
        super().__init__()
        self.model, self.projections = model, projections
        self.loss, self.vocab, self.layers = loss, vocab, list(layers)
        self.chunk = loss.chunk or max(1, CHUNK_LOGITS // vocab)  # positions per chunk

    def forward(self, ids: torch.Tensor, teacher: TeacherStates | None) -> torch.Tensor:
        out = decoder_states(self.model, ids, [s for s, _ in self.layers])
        last = out.last_hidden_state
        hidden = last.reshape(-1, last.shape[-1])
        total = torch.zeros((), device=ids.device)
        if self.loss.logits != "none" or self.loss.ce_weight:
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE)], dim=1).reshape(-1)
            head = self.model.get_output_embeddings()
            chunk_fn = self._chunk_loss(teacher, labels, hidden.shape[0], int((labels != IGNORE).sum()))
            total = total + chunked_loss(hidden, chunk_fn, self.chunk, list(head.parameters()))
        if self.layers:
            pairs = [
                (self.projections[k](out.hidden_states[s + 1]), teacher.layers[k])
                for k, (s, _) in enumerate(self.layers)
            ]
            total = total + self.loss.hidden_weight * sum(
                hidden_state_loss(s, t, self.loss.hidden) for s, t in pairs
            ) / len(pairs)
        return total

    def _chunk_loss(self, teacher: TeacherStates | None, labels: torch.Tensor, tokens: int, predicted: int):
        loss, vocab = self.loss, self.vocab
        kd = LOGIT_LOSSES.get(loss.logits)
        kwargs = {"beta": loss.jsd_beta} if loss.logits == "jsd" else {}

        def chunk_loss(hidden: torch.Tensor, rows: slice) -> torch.Tensor:
            s_logits = head_logits(self.model, hidden)[:, :vocab]
            total = torch.zeros((), device=hidden.device)
            if kd is not None:
                if teacher.top is not None:  # cached: compare on the stored top-k token ids
                    s, t = s_logits.gather(-1, teacher.top[1][rows]), teacher.top[0][rows]
                else:
                    t_logits = teacher.logits(rows, vocab)
                    s, t = top_k_teacher(s_logits, t_logits, loss.top_k) if loss.top_k else (s_logits, t_logits)
                total = total + kd(s, t, loss.temperature, **kwargs) * (hidden.shape[0] / tokens)
            if loss.ce_weight:
                ce = F.cross_entropy(s_logits.float(), labels[rows], ignore_index=IGNORE, reduction="sum")
                total = total + loss.ce_weight * ce / predicted
            return total

        return chunk_loss
