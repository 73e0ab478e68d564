"""The demo's task pieces (loldu.datasets), checked cheaply: the AFINN-165 lexicon read from the afinn
package, a balanced split fixed by the seed with the right labels, and the mean-pooling classifier."""
import pytest
import torch

from loldu.datasets import MeanPoolClassifier, afinn_lexicon, afinn_split
from loldu.errors import LolduError

afinn = pytest.importorskip("afinn")


def test_lexicon_matches_the_afinn_package():
    entries = afinn_lexicon()
    lex = dict(entries)
    assert len(entries) == len(lex) > 3000  # AFINN-165: about 3,400 entries, no repeats
    assert all(-5 <= s <= 5 for s in lex.values())
    assert lex["good"] == 3 and lex["bad"] == -3 and lex["outstanding"] == 5 and lex["bastard"] == -5
    oracle = afinn.Afinn(language="en")  # the package's own scorer: an independent reader of the same file
    for word in ["good", "bad", "abandon", "zealous", "superb", "awful"]:
        assert oracle.score(word) == lex[word]


def test_split_is_deterministic_balanced_and_labelled_by_the_rating():
    train, test = afinn_split(0)
    again_train, again_test = afinn_split(0)
    assert train.texts == again_train.texts and test.labels == again_test.labels  # same seed, same split
    other, _ = afinn_split(1)
    assert other.texts != train.texts  # another seed, another draw
    lex = dict(afinn_lexicon())
    n_pos = sum(s > 0 for s in lex.values())
    assert len(train) + len(test) == 2 * n_pos  # every positive entry and as many negative ones
    for side in (train, test):
        assert 2 * sum(side.labels) == len(side)  # balanced: chance is 50%
        assert len(set(side.texts)) == len(side)
        assert all(y == int(lex[w] > 0) and lex[w] != 0 for w, y in zip(side.texts, side.labels))
    assert not set(train.texts) & set(test.texts)
    assert abs(len(test) / (len(train) + len(test)) - 0.3) < 0.01
    # The oracle scorer agrees on the sign of every single-word entry of the test side.
    oracle = afinn.Afinn(language="en")
    words = [(w, y) for w, y in zip(test.texts, test.labels) if " " not in w and "-" not in w]
    assert len(words) > 600
    assert all((oracle.score(w) > 0) == bool(y) for w, y in words)
    assert "good" in train.texts + test.texts  # every positive entry is used


def test_split_refuses_a_bad_fraction():
    with pytest.raises(LolduError, match="test_fraction"):
        afinn_split(0, test_fraction=1.0)


def _tiny_bert(seed):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_mean_pool_classifier_against_a_float64_oracle():
    bert = _tiny_bert(0)
    model = MeanPoolClassifier(bert, 16, num_labels=2, seed=3).eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        got = model(ids, mask)
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        m = mask.double().unsqueeze(-1)
        want = ((h * m).sum(1) / m.sum(1)) @ model.classifier.weight.double().T + model.classifier.bias.double()
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=0)  # fp32 sums of 7 rows of 16 vs fp64
        # The padded positions do not count: the first row alone, unpadded, gives the same logits (a
        # shorter matmul: equal up to fp32 rounding).
        alone = model(ids[:1, :4], mask[:1, :4])
        assert torch.allclose(alone, got[:1], atol=1e-5, rtol=0)
    # The head's initialization depends on the seed only.
    a = MeanPoolClassifier(_tiny_bert(1), 16, seed=3).classifier.weight
    b = MeanPoolClassifier(_tiny_bert(2), 16, seed=3).classifier.weight
    c = MeanPoolClassifier(_tiny_bert(1), 16, seed=4).classifier.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 16 ** -0.5


def test_batches_trim_the_padding_every_row_has():
    from loldu.demo_task import batches

    ids = torch.arange(4 * 6).view(4, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    data = (ids, mask, torch.tensor([0, 1, 0, 1]))
    got = list(batches(data, 2))
    assert [f["input_ids"].shape for f, _ in got] == [(2, 3), (2, 5)]
    assert torch.equal(got[0][0]["input_ids"], ids[:2, :3]) and torch.equal(got[1][1], torch.tensor([0, 1]))
    (feeds, labels), = batches(data, 4, torch.tensor([2, 0]))  # an order: those rows only, in that order
    assert torch.equal(feeds["attention_mask"], mask[[2, 0], :2]) and torch.equal(labels, torch.tensor([0, 0]))


def test_accuracy_counts_exactly():
    from loldu.demo_task import accuracy

    logits = torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert accuracy(logits, torch.tensor([1, 0, 0])) == 100.0 * 2 / 3


def test_train_is_fixed_by_the_seed_and_learns():
    """The loop the demo and the evaluation share: the same seed gives the same steps (dropout off, the
    order from a seeded generator), the loss falls on a separable toy task, and predict keeps the order."""
    from loldu.demo_task import BATCH, predict, train

    def run(seed):
        model = MeanPoolClassifier(_tiny_bert(0), 16, seed=3)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1, 50, (3 * BATCH, 5), generator=g)
        labels = (ids[:, 0] < 25).long()
        data = (ids, torch.ones_like(ids), labels)
        log = train(model, [{"params": list(model.parameters()), "lr": 1e-2}], data, epochs=4, seed=seed)
        return log, predict(model, data), labels

    a, logits, labels = run(0)
    b, again, _ = run(0)
    assert a.losses == b.losses and torch.equal(logits, again) and len(a.losses) == 12
    assert a.mean_loss(False, 3) < a.mean_loss(True, 3)
    assert run(1)[0].losses != a.losses  # another seed, another order
    model = MeanPoolClassifier(_tiny_bert(0), 16)
    ids = labels[:, None] + 1
    short = train(model, [{"params": list(model.classifier.parameters()), "lr": 1e-2}],
                  (ids, torch.ones_like(ids), labels), epochs=1, seed=0, max_steps=2)
    assert len(short.times) == len(short.losses) == 2 and not model.training


def test_train_scores_after_each_epoch_in_eval_mode():
    """on_epoch(k) runs after each full pass, with the model in eval mode."""
    from loldu.demo_task import BATCH, train

    model = MeanPoolClassifier(_tiny_bert(0), 16, seed=3)
    ids = torch.randint(1, 50, (2 * BATCH, 5))
    labels = (ids[:, 0] < 25).long()
    seen = []
    log = train(model, [{"params": list(model.parameters()), "lr": 1e-2}], (ids, torch.ones_like(ids), labels),
                epochs=3, seed=0, on_epoch=lambda k: seen.append((k, model.training)))
    assert seen == [(1, False), (2, False), (3, False)]
    assert len(log.losses) == 6 and not model.training
