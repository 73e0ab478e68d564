"""A real labelled task that needs no download, for the demo, the evaluation and the tests (the
training loop they share is loldu.demo_task).

AFINN-165 (Finn Årup Nielsen's sentiment lexicon, shipped in the PyPI package `afinn`, file
afinn/data/AFINN-en-165.txt): about 3,400 English words and short phrases, each rated by a person
from -5 (very negative) to +5 (very positive). The task: tell positive from negative entries
(label 1 for a rating > 0, 0 for < 0; the few entries rated 0 are dropped).

`afinn_split(seed)` balances the classes (every positive entry and as many negative ones, drawn by
the seed; the lexicon holds about twice as many negative as positive entries, so a majority-class
guess scores 50%) and splits each class into train and test by the same seed: the same seed gives
the same split on every machine (a seeded torch.Generator, not Python's hash order).
"""
from dataclasses import dataclass
from typing import List, Tuple

import torch

from .errors import LolduError

AFINN_FILE = "AFINN-en-165.txt"


@dataclass
class Split:
    """Texts and labels (1 positive, 0 negative) of one side of the split."""
    texts: List[str]
    labels: List[int]

    def __len__(self) -> int:
        return len(self.texts)


def afinn_lexicon() -> List[Tuple[str, int]]:
    """Every (word or phrase, rating) of AFINN-165, in the file's order, read from the installed
    `afinn` package (PyPI afinn==0.1)."""
    try:
        from importlib.resources import files

        path = files("afinn").joinpath("data", AFINN_FILE)
        text = path.read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise LolduError("loldu.datasets: the AFINN-165 lexicon comes from the PyPI package afinn "
                         "(pip install afinn==0.1)") from None
    except OSError as e:
        raise LolduError(f"loldu.datasets: cannot read {AFINN_FILE} from the afinn package ({e})") from None
    entries = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        word, sep, rating = line.rpartition("\t")
        try:
            if not sep or not word:
                raise ValueError
            entries.append((word, int(rating)))
        except ValueError:
            raise LolduError(f"loldu.datasets: {AFINN_FILE} line {lineno}: expected 'word<TAB>rating', "
                             f"got {line!r}") from None
    return entries


def afinn_split(seed: int = 0, test_fraction: float = 0.3) -> Tuple[Split, Split]:
    """(train, test) of the balanced positive-vs-negative AFINN-165 task, fixed by `seed`.

    Each class contributes round(test_fraction * n) entries to test and the rest to train, where n
    is the number of positive entries; both sides are balanced and shuffled (by the seed)."""
    if not 0.0 < test_fraction < 1.0:
        raise LolduError(f"loldu.datasets.afinn_split: test_fraction must be in (0, 1), got {test_fraction!r}")
    entries = afinn_lexicon()
    pos = [w for w, s in entries if s > 0]
    neg = [w for w, s in entries if s < 0]
    g = torch.Generator().manual_seed(seed)
    n = min(len(pos), len(neg))
    pos = [pos[i] for i in torch.randperm(len(pos), generator=g)[:n].tolist()]
    neg = [neg[i] for i in torch.randperm(len(neg), generator=g)[:n].tolist()]
    n_test = round(test_fraction * n)
    sides = []
    for part in (slice(n_test, None), slice(None, n_test)):
        texts = pos[part] + neg[part]
        labels = [1] * len(pos[part]) + [0] * len(neg[part])
        order = torch.randperm(len(texts), generator=g).tolist()
        sides.append(Split([texts[i] for i in order], [labels[i] for i in order]))
    return sides[0], sides[1]


class MeanPoolClassifier(torch.nn.Module):
    """A sentence classifier: an encoder (transformers BertModel, say), the mean of its last hidden
    states over the real tokens, and a linear head `classifier` (trained fully: name it in the
    LoLDUConfig's modules_to_save). forward(input_ids, attention_mask) returns the logits."""

    def __init__(self, bert: torch.nn.Module, hidden: int, num_labels: int = 2, seed: int = 0):
        super().__init__()
        self.bert = bert
        g = torch.Generator().manual_seed(seed)
        self.classifier = torch.nn.Linear(hidden, num_labels)
        with torch.no_grad():  # the head's initial weights depend on the seed only, not on torch's global RNG
            bound = hidden ** -0.5
            self.classifier.weight.copy_(torch.rand(num_labels, hidden, generator=g) * 2 * bound - bound)
            self.classifier.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.classifier((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def load_minilm_tokenizer():
    """The offline MiniLM's tokenizer (local_files_only=True)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from .presets import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def load_minilm_classifier(num_labels: int = 2, seed: int = 0):
    """(MeanPoolClassifier over the offline MiniLM without its pooler, tokenizer), loaded with
    local_files_only=True and dropout off (so a step depends only on the data order and the seed)."""
    from transformers import AutoModel

    from .presets import minilm_path

    tok = load_minilm_tokenizer()
    path = minilm_path()
    bert = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return MeanPoolClassifier(bert, bert.config.hidden_size, num_labels, seed), tok
