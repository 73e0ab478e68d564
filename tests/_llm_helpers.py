"""Tiny random causal LMs (Llama, GPT-2, Mixtral) and the greedy-token agreement check the LLM tests share.

Two computations of the same logits (KV cache and full recompute, merged and unmerged weights, PyTorch
and ONNX Runtime) round differently, so they are never compared bit for bit: their logits agree within a
bound, and their greedy tokens must agree wherever the reference's top-1 logit leads its runner-up by
more than twice that bound (there, no rounding within the bound can change the argmax).
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

import loldu

VOCAB = 128


def _no_eos(model):
    # Greedy runs a fixed number of steps: no row may stop early on a random end-of-sequence token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny_llama():
    return _no_eos(LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=0)))


def tiny_gpt2():
    return _no_eos(GPT2LMHeadModel(GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_inner=96, vocab_size=VOCAB, n_positions=64, bos_token_id=None,
        eos_token_id=None, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)))


def tiny_mixtral():
    return _no_eos(MixtralForCausalLM(MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        bos_token_id=None, eos_token_id=None, pad_token_id=0)))


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mixtral": tiny_mixtral}


def train_like(model, name="default", scale=0.5):
    """Moves adapter `name`'s z as training would (a relative step on every pivot), so c != 0."""
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            z = layer.loldu_z[name]
            z.add_(scale * torch.randn_like(z) * (z.abs() + 0.05))
    return model


def prompts(batch=3, length=5):
    return torch.randint(0, VOCAB, (batch, length))


@torch.no_grad()
def generate(model, ids, steps=6, use_cache=True):
    """Greedy tokens (batch, steps) and the logits each step chose them from (batch, steps, vocab), fp64."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         use_cache=use_cache, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1).double()


@torch.no_grad()
def logits_along(model, ids, tokens):
    """The model's logits for every generated position along a trajectory, in one full forward (no cache)."""
    seq = torch.cat([ids, tokens], 1)[:, :-1]
    out = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
    return out.logits[:, ids.shape[1] - 1:].double()


def bound_for(ref, rel=1e-4):
    """rel of the largest logit (at least rel): fp32 rounding through a 2-layer model stays far below it."""
    return rel * max(1.0, float(ref.abs().max()))


def check_trajectory(tokens, logits, ref_logits, bound):
    """`tokens` were chosen greedily from `logits`; `ref_logits` are another computation's along the same
    trajectory. Asserts the logits agree within `bound` and the tokens are the reference's argmax at every
    step whose margin is clear (> 2 bound). Returns, per row and step, whether the margin was clear: up to
    a row's first unclear step the reference's own greedy run follows exactly these tokens."""
    diff = float((logits - ref_logits).abs().max())
    assert diff <= bound, (diff, bound)
    top2 = ref_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * bound
    same = ref_logits.argmax(-1) == tokens
    assert bool(same[clear].all()), (tokens, ref_logits.argmax(-1), clear)
    return clear


def assert_same_where_clear(tokens, ref_tokens, clear):
    """Greedy tokens of two computations equal on each row up to its first step whose margin was not clear
    (`clear`: check_trajectory's (rows, steps)); after a near-tie the two runs may rightly part (tiny random
    models have many: logits within 2e-4 of each other). A row whose first step is a near-tie compares no
    token; check_trajectory has still bounded its logits at every step."""
    prefix = clear.to(torch.int64).cumprod(1).bool()
    assert torch.equal(tokens[prefix], ref_tokens[prefix]), (tokens, ref_tokens, clear)
