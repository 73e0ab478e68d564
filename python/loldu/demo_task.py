"""Training and scoring on the demo's task, one code path for the demo (loldu.demo) and the
evaluation (benchmarks/eval_peft.py), so that the demo's numbers are the evaluation's numbers at one
configuration (docs/evaluation.md).

The task is loldu.datasets.afinn_split; the model is any module called as model(input_ids=...,
attention_mask=...) that returns logits (loldu.datasets.MeanPoolClassifier). The budget is the
evaluation's: batches of BATCH, at most MAX_LEN tokens, Adam without weight decay at constant rates,
the head at HEAD_LR.
"""
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .progress import Progress

BATCH = 32
MAX_LEN = 16
HEAD_LR = 1e-2
EVAL_BATCH = 128

# (input_ids, attention_mask, labels) of a whole split, padded to max_len.
Encoded = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def encode(tok, split, max_len: int = MAX_LEN) -> Encoded:
    """Tokenizes a loldu.datasets.Split once; `batches` trims the padding per batch."""
    e = tok(split.texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return e["input_ids"], e["attention_mask"], torch.tensor(split.labels)


def batches(data: Encoded, size: int, order: Optional[torch.Tensor] = None
            ) -> Iterator[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
    """(model inputs, labels) of `size` rows at a time, in `order` (default: as stored). Columns that
    are padding in every row of a batch are cut: a short batch costs what its longest text costs."""
    ids, mask, labels = data
    idx = torch.arange(len(labels)) if order is None else order
    for i in range(0, len(idx), size):
        b = idx[i:i + size]
        n_tok = int(mask[b].sum(1).max())
        yield {"input_ids": ids[b, :n_tok], "attention_mask": mask[b, :n_tok]}, labels[b]


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, feeds: Dict[str, torch.Tensor],
               labels: torch.Tensor) -> torch.Tensor:
    """One cross-entropy step; returns the loss (a tensor: reading it waits for the step)."""
    loss = F.cross_entropy(model(**feeds), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


@dataclass
class TrainLog:
    """Each step's loss and wall time in seconds."""
    losses: List[float] = field(default_factory=list)
    times: List[float] = field(default_factory=list)

    def mean_loss(self, first: bool, k: int = 10) -> float:
        """The mean loss of the first (or the last) k steps."""
        part = self.losses[:k] if first else self.losses[-k:]
        return statistics.fmean(part)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)


def train(model: torch.nn.Module, groups: Sequence[dict], data: Encoded, epochs: int, seed: int,
          max_steps: Optional[int] = None, desc: Optional[str] = None,
          on_epoch: Optional[Callable[[int], None]] = None) -> TrainLog:
    """Trains `model` on `data` with Adam over the parameter groups (each with its own "lr"): `epochs`
    passes in an order drawn from `seed`, stopped after `max_steps` steps if given. Leaves the model in
    eval mode. `desc` names the progress output (none without it). `on_epoch(k)` runs after the k-th
    full pass with the model in eval mode (e.g. to score it: how far from converged a budget is)."""
    opt = torch.optim.Adam(groups)
    g = torch.Generator().manual_seed(seed)
    n_rows = len(data[2])
    n = (n_rows + BATCH - 1) // BATCH * epochs
    n = min(n, max_steps) if max_steps else n
    log = TrainLog()
    model.train()
    with Progress(n, desc or "training", "steps", enabled=desc is not None) as p:
        for epoch in range(epochs):
            for feeds, y in batches(data, BATCH, torch.randperm(n_rows, generator=g)):
                if len(log.losses) == n:
                    break
                t0 = time.perf_counter()
                loss = train_step(model, opt, feeds, y)
                log.times.append(time.perf_counter() - t0)
                log.losses.append(loss.item())
                p.update()
            if on_epoch is not None:
                model.eval()
                on_epoch(epoch + 1)
                model.train()
    model.eval()
    return log


@torch.no_grad()
def predict(model: torch.nn.Module, data: Encoded) -> torch.Tensor:
    """The logits of every row of `data`, in order."""
    return torch.cat([model(**feeds) for feeds, _ in batches(data, EVAL_BATCH)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percent of rows whose arg-max logit is the label."""
    return 100.0 * int((logits.argmax(-1) == labels).sum()) / len(labels)
