"""Causal LMs to ONNX: the logits graph (input_ids, attention_mask -> logits; dynamic batch and length, no
KV cache) of tiny random Llama and GPT-2 with LoLDU adapters, merged and unmerged, driven greedily in ONNX
Runtime against PyTorch's greedy tokens without cache; the decoding step with its KV cache as graph
inputs and outputs (loldu.export.causal_lm); `loldu export` on model directories without a tokenizer
that pads (examples drawn from the config's vocabulary)."""
import warnings

import pytest
import torch
from _llm_helpers import (
    MODELS,
    VOCAB,
    assert_same_where_clear,
    bound_for,
    check_trajectory,
    generate,
    logits_along,
    prompts,
    train_like,
)

import loldu
from loldu.cli import main

pytest.importorskip("onnxruntime")
lx = pytest.importorskip("loldu.export")
pytestmark = pytest.mark.usefixtures("one_thread")


def ort_greedy(runner, ids, steps=6):
    """Greedy tokens (batch, steps) and their logits (batch, steps, vocab) fp64, the whole sequence run
    through the logits graph at every step (it has no cache)."""
    tokens, logits = [], []
    seq = ids
    for _ in range(steps):
        out = runner.run({"input_ids": seq, "attention_mask": torch.ones_like(seq)})["logits"]
        last = torch.from_numpy(out[:, -1]).double()
        logits.append(last)
        tokens.append(last.argmax(-1))
        seq = torch.cat([seq, tokens[-1][:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def check_ort_greedy(path, model, ids):
    """ORT's greedy run agrees with PyTorch's (the caller's adapted model, no cache) within FP32_BOUND on
    the logits, and token for token wherever the margins are clear (_llm_helpers)."""
    runner = lx.OrtRunner(path, provider="cpu", quiet=True)
    assert runner.output_names == ["logits"]
    tokens, logits = ort_greedy(runner, ids)
    ref = logits_along(model, ids, tokens)
    rows = check_trajectory(tokens, logits, ref, lx.FP32_BOUND * max(1.0, float(ref.abs().max())))
    torch_tokens, _ = generate(model, ids, use_cache=False)
    assert_same_where_clear(tokens, torch_tokens, rows)
    return tokens


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ort_greedy_tokens_equal_pytorch(kind, tmp_path):
    model = MODELS[kind]()
    loldu.inject(model, loldu.LoLDUConfig(rank=8, target_modules="all-linear"))
    train_like(model)
    example = {"input_ids": prompts(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    ids = prompts(3, 5)  # another batch and length than the trace: both axes are dynamic
    for merge in (True, False):
        path = tmp_path / f"{kind}_{merge}.onnx"
        report = lx.to_onnx(model, example, path, merge=merge)
        assert report.output_names == ["logits"] and report.input_names == ["input_ids", "attention_mask"]
        assert report.merged == ("default" if merge else None)
        check_ort_greedy(path, model, ids)
    assert loldu.adapter_names(model) == ["default"] and loldu.active_adapter(model) == "default"
    with loldu.disabled(model):  # the graphs hold the adapter: the base model's logits are far off
        base = logits_along(model, ids, generate(model, ids)[0])
    assert float((base - logits_along(model, ids, generate(model, ids)[0])).abs().max()) > 100 * bound_for(base)


def _tokenizer_without_pad(directory):
    """A word-level fast tokenizer with no padding token (GPT-2's tokenizer has none either)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    assert fast.pad_token is None
    fast.save_pretrained(directory)


def test_cli_exports_gpt2_whose_tokenizer_cannot_pad(tmp_path, capsys):
    """No adapter: the causal LM class the config names (GPT2LMHeadModel, logits) rather than AutoModel."""
    model = MODELS["gpt2"]()
    base = tmp_path / "gpt2"
    model.save_pretrained(base)
    _tokenizer_without_pad(base)
    out = tmp_path / "gpt2.onnx"
    assert main(["export", "--base", str(base), "--out", str(out)]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "outputs: logits" in text and "parity (CPUExecutionProvider)" in text
    check_ort_greedy(out, model, prompts(2, 4))


def test_cli_exports_llama_without_tokenizer_with_adapter(tmp_path, capsys):
    model = MODELS["llama"]()
    base = tmp_path / "llama"
    model.save_pretrained(base)
    loldu.inject(model, loldu.LoLDUConfig(rank=4, target_modules="all-linear"))
    train_like(model)
    loldu.save_adapter(model, tmp_path / "ad")
    out = tmp_path / "llama.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: no tokenizer is needed
        code = main(["export", "--base", str(base), "--adapter", str(tmp_path / "ad"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "merged adapter: default" in text and "outputs: logits" in text
    check_ort_greedy(out, model, prompts(2, 6))


def test_token_inputs_need_a_vocabulary():
    from transformers import PretrainedConfig

    from loldu.errors import ExportError
    from loldu.export.onnx_export import token_inputs

    feeds = token_inputs(MODELS["llama"]().config, 3, 4, seed=0)
    assert feeds["input_ids"].shape == (3, 4) and int(feeds["input_ids"].max()) < VOCAB
    assert torch.equal(feeds["input_ids"], token_inputs(MODELS["llama"]().config, 3, 4, seed=0)["input_ids"])
    with pytest.raises(ExportError, match="no vocab_size"):
        token_inputs(PretrainedConfig(), 2, 2, seed=0)



def ort_cached_greedy(runner, ids, layers, shape, steps=6):
    """Greedy decoding through the step graph: the prompt after an empty cache (past length 0), then one
    token per step after the presents the step before returned. shape: (kv heads, head dim)."""
    from loldu.export.causal_lm import cache_names

    names = cache_names(layers)
    cache = {n: torch.zeros(ids.shape[0], *shape[:1], 0, *shape[1:]) for n in names}
    tokens, logits, cur = [], [], ids
    for _ in range(steps):
        total = cache[names[0]].shape[2] + cur.shape[1]
        outs = runner.run({"input_ids": cur, "attention_mask": torch.ones(ids.shape[0], total, dtype=torch.long),
                           **cache})
        last = torch.from_numpy(outs["logits"][:, -1]).double()
        logits.append(last)
        tokens.append(last.argmax(-1))
        cache = {n: torch.from_numpy(outs[n.replace("past", "present", 1)]) for n in names}
        cur = tokens[-1][:, None]
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("kind,merge", [("llama", True), ("gpt2", False)])
def test_kv_cache_graph_greedy_tokens_equal_pytorch(kind, merge, tmp_path):
    """The decoding step with its KV cache as graph inputs and outputs (loldu.export.causal_lm): greedy
    decoding in ONNX Runtime, cache grown step by step from empty, against PyTorch's greedy without cache."""
    from loldu.export.causal_lm import to_onnx_with_cache

    model = MODELS[kind]()
    loldu.inject(model, loldu.LoLDUConfig(rank=8, target_modules="all-linear"))
    train_like(model)
    path = tmp_path / "step.onnx"
    report = to_onnx_with_cache(model, path, merge=merge)  # parity checked at batch 3, past 4, one token
    layers = model.config.num_hidden_layers
    assert report.output_names[0] == "logits" and len(report.output_names) == 1 + 2 * layers
    runner = lx.OrtRunner(path, provider="cpu", quiet=True)
    ids = prompts(3, 5)
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    tokens, logits = ort_cached_greedy(runner, ids, layers, (kv_heads, model.config.hidden_size // heads))
    ref = logits_along(model, ids, tokens)
    rows = check_trajectory(tokens, logits, ref, lx.FP32_BOUND * max(1.0, float(ref.abs().max())))
    assert_same_where_clear(tokens, generate(model, ids, use_cache=False)[0], rows)
