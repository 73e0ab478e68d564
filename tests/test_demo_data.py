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
