"""An instruction task for a causal LM, offline: AFINN-165 words as questions with a one-word answer,
for the LLM demo (loldu.demo_llm) and the LLM evaluation (benchmarks/eval_llm.py, docs/evaluation.md).

Each AFINN-165 entry (loldu.datasets) becomes one chat turn, built with the tokenizer's own chat
template: the user asks "Is the word 'X' positive or negative? Answer with one word." and the
assistant answers "positive" or "negative" (task "sentiment"), or, in the "rating" variant, the
entry's -5..5 rating as a number. Training puts the loss on the answer tokens and the end-of-turn
token only (`CausalLMCollator`: labels -100 on the prompt and the padding); scoring generates
greedily with the KV cache from left-padded prompts and parses the reply (`accuracy_by_generation`).

The split (`llm_split`) reuses loldu.datasets.afinn_split(0), the encoder demo's balanced split:
validation and train come from its train side, test from its test side, so the three are disjoint
and the same on every machine.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .datasets import afinn_lexicon, afinn_split
from .errors import LolduError
from .progress import Progress

QUESTIONS = {
    "sentiment": "Is the word '{}' positive or negative? Answer with one word.",
    "rating": "How positive is the word '{}' on a scale from -5 (very negative) to 5 (very positive)? "
              "Answer with one number.",
}
LABELS = ("negative", "positive")
IGNORE = -100  # the label value transformers' causal-LM loss skips


@dataclass(frozen=True)
class Example:
    """One AFINN-165 entry as an instruction: the word, its rating and the expected answer text."""
    word: str
    rating: int
    answer: str


@dataclass
class LLMSplit:
    """Disjoint train / validation / test examples of one task."""
    train: List[Example]
    val: List[Example]
    test: List[Example]


def answer_of(rating: int, task: str) -> str:
    if task == "sentiment":
        return LABELS[rating > 0]
    return str(rating)


def llm_split(n_train: int, n_val: int, n_test: int, task: str = "sentiment", seed: int = 0) -> LLMSplit:
    """The first n_val entries of afinn_split(seed)'s train side for validation, the next n_train for
    training, the first n_test of its test side for test (each side is balanced and shuffled by the
    seed, so a prefix is close to balanced)."""
    if task not in QUESTIONS:
        raise LolduError(f"loldu.llm_task: task must be one of {sorted(QUESTIONS)}, got {task!r}")
    train_side, test_side = afinn_split(seed)
    if n_train + n_val > len(train_side) or n_test > len(test_side) or min(n_train, n_val, n_test) < 0:
        raise LolduError(f"loldu.llm_task: n_train + n_val must be <= {len(train_side)} and n_test <= "
                         f"{len(test_side)} (non-negative), got {n_train}, {n_val}, {n_test}")
    rating = dict(afinn_lexicon())

    def examples(words):
        return [Example(w, rating[w], answer_of(rating[w], task)) for w in words]

    return LLMSplit(train=examples(train_side.texts[n_val:n_val + n_train]), val=examples(train_side.texts[:n_val]),
                    test=examples(test_side.texts[:n_test]))


def prompt_text(tok, word: str, task: str = "sentiment", system: Optional[str] = None) -> str:
    """The chat-template text of the question, up to and including the assistant's turn header."""
    messages = [{"role": "user", "content": QUESTIONS[task].format(word)}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_token_id(tok) -> int:
    """The token that ends the assistant's turn (SmolLM2: <|im_end|>, its eos)."""
    if tok.eos_token_id is None:
        raise LolduError(f"loldu.llm_task: the tokenizer {type(tok).__name__} has no eos token to end an answer with")
    return tok.eos_token_id


def encode_example(tok, ex: Example, task: str = "sentiment", system: Optional[str] = None) -> Dict[str, List[int]]:
    """{"input_ids", "labels"}: the prompt, then the answer and the end-of-turn token; labels are
    IGNORE on the prompt, so the loss falls on the answer and the end token only."""
    prompt = tok(prompt_text(tok, ex.word, task, system), add_special_tokens=False)["input_ids"]
    answer = tok(ex.answer, add_special_tokens=False)["input_ids"] + [end_token_id(tok)]
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else end_token_id(tok)


class CausalLMCollator:
    """A data collator (transformers' Trainer `data_collator`) for `encode_example` rows: pads on the
    right to the longest row with the pad token, attention_mask 0 and labels IGNORE there. Right
    padding keeps every row's positions 0, 1, ... as in generation from an unpadded prompt."""

    def __init__(self, tok):
        self.pad = pad_id(tok)

    def __call__(self, rows: Sequence[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            if len(r["labels"]) != k:
                raise LolduError(f"loldu.llm_task.CausalLMCollator: row {i} has {k} input_ids but {len(r['labels'])} labels")
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def parse_answer(text: str, task: str = "sentiment") -> Tuple[Optional[str], bool]:
    """(the answer read from a generated reply, whether it was the reply's first word).

    sentiment: the first word that is "positive" or "negative" (case and punctuation ignored), so a
    chatty zero-shot reply ("The word 'good' is positive.") is read too; rating: the first integer."""
    if task == "rating":
        nums = list(re.finditer(r"[-+]?\d+", text))
        if not nums:
            return None, False
        return str(int(nums[0].group())), text.strip().startswith(nums[0].group())
    words = re.findall(r"[a-z]+", text.lower())
    for i, w in enumerate(words):
        if w in LABELS:
            return w, i == 0
    return None, False


@dataclass
class GenerationScore:
    """Accuracy in percent (a reply whose parsed answer is the expected one), the share of replies whose
    first word was the answer, and every reply."""
    accuracy: float
    first_word: float
    replies: List[str]


@torch.no_grad()
def generate_replies(model, tok, prompts: Sequence[str], batch: int = 32, max_new_tokens: int = 12,
                     desc: Optional[str] = None) -> List[str]:
    """Greedy replies (KV cache) to chat-template prompts, `batch` at a time, left-padded so that every
    row's reply starts at the same column."""
    side = tok.padding_side
    tok.padding_side = "left"
    replies = []
    was_training = model.training
    model.eval()
    try:
        with Progress(len(prompts), desc or "generating", "prompts", enabled=desc is not None) as bar:
            for i in range(0, len(prompts), batch):
                enc = tok(list(prompts[i:i + batch]), return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=pad_id(tok), eos_token_id=end_token_id(tok))
                replies += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                bar.update(len(enc["input_ids"]))
    finally:
        tok.padding_side = side
        model.train(was_training)
    return replies


def accuracy_by_generation(model, tok, examples: Sequence[Example], batch: int = 32, task: str = "sentiment",
                           system: Optional[str] = None, max_new_tokens: int = 12,
                           desc: Optional[str] = None) -> GenerationScore:
    """Greedy generation on every example, parsed by `parse_answer` and compared with its answer."""
    if not examples:
        raise LolduError("loldu.llm_task.accuracy_by_generation: no examples to score")
    prompts = [prompt_text(tok, ex.word, task, system) for ex in examples]
    replies = generate_replies(model, tok, prompts, batch, max_new_tokens, desc)
    parsed = [parse_answer(r, task) for r in replies]
    right = sum(a == ex.answer for (a, _), ex in zip(parsed, examples))
    first = sum(a == ex.answer and f for (a, f), ex in zip(parsed, examples))
    return GenerationScore(100.0 * right / len(examples), 100.0 * first / len(examples), replies)


def load_smollm2(dtype=torch.float32):
    """(SmolLM2-135M-Instruct, its tokenizer) from loldu.presets.smollm2_path(), offline, in eval mode.
    Its weights went through 4-bit (Q4_1) quantization: it ships as a GGUF file (loldu.presets)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .presets import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    return model.eval(), tok


SYSTEM = ""  # an empty system turn: SmolLM2's template otherwise adds a 20-token default (CPU time per token)


@dataclass
class TrainResult:
    """Each logged step's loss, the median seconds per step and the whole run's seconds."""
    losses: List[float]
    step_s: float
    seconds: float


def _step_callback(total: int, desc: Optional[str]):
    """A transformers TrainerCallback that records each optimizer step's wall time in `.times` and shows
    loldu's progress output (a bar in a terminal, start and end lines in a log) when `desc` is given."""
    import time

    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def __init__(self):
            self.times: List[float] = []
            self._t0 = 0.0
            self.bar = Progress(total, desc or "training", "steps", enabled=desc is not None)

        def on_train_begin(self, args, state, control, **kw):
            self.bar.__enter__()

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t0)
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kw):
            self.bar.__exit__(None, None, None)

    return StepProgress()


def train_lm(model, tok, rows: Sequence[Dict[str, List[int]]], steps: int, batch: int, lr: float, seed: int,
             out_dir: str, trainer_cls=None, desc: Optional[str] = None) -> TrainResult:
    """`steps` optimizer steps of `batch` rows (AdamW without weight decay at a constant rate, rows drawn in
    an order fixed by `seed`) with transformers' Trainer, loldu.LoLDUTrainer by default (the class to use
    for a LoLDU model; pass transformers.Trainer for a PEFT or a plain model). Checkpoints are not written.
    `desc` names the progress output (none without it). The model is left in eval mode."""
    import statistics
    import time

    from transformers import PrinterCallback, TrainingArguments

    if trainer_cls is None:
        from .trainer import LoLDUTrainer as trainer_cls
    args = TrainingArguments(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             lr_scheduler_type="constant", weight_decay=0.0, warmup_steps=0, seed=seed, data_seed=seed,
                             save_strategy="no", report_to=[], logging_steps=1, use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False)
    timer = _step_callback(steps, desc)
    trainer = trainer_cls(model=model, args=args, train_dataset=list(rows), data_collator=CausalLMCollator(tok),
                          callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # a dict per logged step: the losses are read from log_history
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer
    return TrainResult(losses, statistics.median(timer.times) if timer.times else float("nan"), seconds)
