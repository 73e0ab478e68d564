"""One rank of tests/test_fsdp.py, run by `torchrun --nproc_per_node 2` (gloo, CPU).

A tiny random Llama is sharded with FSDP2 (fully_shard per decoder layer, then the root), then
injected (shard, then adapt), trained on this rank's half of every global batch, saved from rank 0,
merged and unmerged on the shards. What the test compares is written to OUT (argv[1]); argv[2] is
the seed (every rank builds the same base).
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import loldu
from loldu import LoLDUConfig, distributed

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, LR, BATCH, SEQ = 3, 1e-2, 4, 8
# The equality runs use SGD: its step is linear in the gradient, so the ranks' rounding-level difference
# stays rounding-level. Adam divides by |gradient|: a gradient near 0 (full-rank layers have some of
# 1e-7) turns such a difference into a step difference of up to 2 lr. The Trainer run uses AdamW.
SGD_LR = 1.0
SCENARIOS = {  # name -> (rank, factor_storage, target_modules)
    "full": (4, "full", TARGETS),
    "cur": (4, "cur", TARGETS),
    "lu": ("full", "lu", TARGETS),  # full rank: min(d, k) per layer (32 for k_proj and v_proj, else 64)
}


def llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def batches(seed: int):
    """STEPS global batches of token ids (BATCH, SEQ), and a probe batch."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, 128, (BATCH, SEQ), generator=g) for _ in range(STEPS + 1)]


def config(name: str) -> LoLDUConfig:
    r, storage, targets = SCENARIOS[name]
    return LoLDUConfig(rank=r, target_modules=targets, factor_storage=storage, train_scale=True)


def adapter_state(model) -> dict:
    return {f"{n}.{k}": p.detach().clone() for n, layer in loldu.adapted_layers(model)
            for k, p in (("z", layer.loldu_z["default"]), ("sigma", layer.loldu_sigma["default"]))}


def holdings(model) -> dict:
    """Per layer: the largest factor tensor this rank holds (elements) against the whole factors'."""
    out = {}
    for n, layer in loldu.adapted_layers(model):
        held, whole = 0, 0
        for key in layer.store.keys:
            t = layer._parameters.get(key, layer._buffers.get(key))
            local = t.to_local() if isinstance(t, DTensor) else t
            held, whole = max(held, local.numel()), max(whole, t.numel())
        if layer.store.owns_weight:  # the LU is the weight's own shard
            w = layer.base_layer.weight
            held, whole = w.to_local().numel(), w.numel()
        buffers = max(b.numel() for b in layer.buffers())
        out[n] = {"held": held, "whole": whole, "largest_buffer": buffers, "is_dtensor": all(
            isinstance(layer._parameters[k], DTensor) for k in layer.store.keys if k in layer._parameters)}
    return out


def sharded(seed: int) -> LlamaForCausalLM:
    model = llama(seed)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def switching(model, probe) -> dict:
    """A second adapter on the shards: active alone, per row beside the trained one, then deleted."""
    loldu.add_adapter(model, "other")
    loldu.set_adapter(model, "other")
    out = {"other": logits(model, probe)}
    with loldu.adapter_ids(model, ["default", "other", None, "default"]):
        out["rows"] = logits(model, probe)
    loldu.set_adapter(model, "default")
    loldu.delete_adapter(model, "other")
    with loldu.disabled(model):
        out["disabled"] = logits(model, probe)
    return out


def load_onto_sharded(seed: int, adir: str, probe) -> dict:
    """The saved adapter loaded onto a freshly sharded base: its logits, or the error."""
    try:
        model = loldu.load_adapter(sharded(seed), adir)
    except Exception as e:  # reported to the test, which says what is expected
        return {"error": f"{type(e).__name__}: {e}"}
    return {"loaded_sharded": logits(model, probe)}


def scenario(name: str, seed: int, out: str, rank: int, world: int) -> None:
    model = sharded(seed)
    data = batches(seed)
    probe = data[-1][:, :SEQ]
    with torch.no_grad():
        base_logits = model(probe).logits
    loldu.inject(model, config(name))
    with torch.no_grad():
        init_logits = model(probe).logits
    opt = torch.optim.SGD(loldu.trainable_parameters(model), lr=SGD_LR)
    losses = []
    half = BATCH // world
    for ids in data[:STEPS]:
        mine = ids[rank * half:(rank + 1) * half]
        opt.zero_grad()
        loss = model(mine, labels=mine).loss
        loss.backward()
        opt.step()
        both = loss.detach().clone()
        dist.all_reduce(both)
        losses.append(float(both) / world)
    with torch.no_grad():
        trained = model(probe).logits
    adir = os.path.join(out, f"{name}_adapter")
    distributed.save_adapter(model, adir)
    save_file(adapter_state(model), os.path.join(out, f"{name}_z_rank{rank}.safetensors"))
    report = {"losses": losses, "holdings": holdings(model)}
    extra = switching(model, probe)
    loldu.merge(model)
    with torch.no_grad():
        merged = model(probe).logits
    loldu.unmerge(model)
    with torch.no_grad():
        unmerged = model(probe).logits
    loldu.merge_and_unload(model)
    with torch.no_grad():
        unloaded = model(probe).logits
    report["plain_after_unload"] = not loldu.adapted_layers(model) and all(
        isinstance(m.weight, DTensor) for n, m in model.named_modules() if n.endswith(tuple(TARGETS)))
    loaded = load_onto_sharded(seed, adir, probe)
    report["load_sharded_error"] = loaded.pop("error", None)
    if rank == 0:
        save_file({"base": base_logits, "init": init_logits, "trained": trained, "merged": merged,
                   "unmerged": unmerged, "unloaded": unloaded, "probe": probe, **extra, **loaded},
                  os.path.join(out, f"{name}_logits.safetensors"))
        with open(os.path.join(out, f"{name}_report.json"), "w") as f:
            json.dump(report, f)


def trainer_run(seed: int, out: str, rank: int) -> None:
    """LoLDUTrainer on the sharded, injected model: two steps, a checkpoint, the probe's logits after."""
    from transformers import TrainingArguments

    from loldu.trainer import LoLDUTrainer

    model = llama(seed)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    loldu.inject(model, config("full"))
    data = [{"input_ids": ids, "labels": ids} for batch in batches(seed)[:2] for ids in batch]
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=2, max_steps=2,
                             save_steps=2, learning_rate=LR, report_to=[], use_cpu=True, logging_steps=1,
                             dataloader_num_workers=0, disable_tqdm=True)
    LoLDUTrainer(model=model, args=args, train_dataset=data).train()
    with torch.no_grad():
        logits = model(batches(seed)[-1]).logits
    # Resuming restores the checkpoint's adapter into the injected, sharded model, then trains on.
    args.max_steps = 3
    resumed = LoLDUTrainer(model=model, args=args, train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    with open(os.path.join(out, f"trainer_resume_rank{rank}.json"), "w") as f:
        json.dump({"global_step": resumed.state.global_step}, f)
    z = adapter_state(model)
    save_file(z, os.path.join(out, f"trainer_z_rank{rank}.safetensors"))
    if rank == 0:
        save_file({"trained": logits}, os.path.join(out, "trainer_logits.safetensors"))


def refusals(seed: int, out: str, rank: int) -> None:
    """A NaN in one rank's shard only: every rank refuses the inject alike, naming the layer, and the
    model stays as it was (no LoLDU layer, its forward the base's)."""
    model = sharded(seed)
    probe = batches(seed)[-1]
    before = logits(model, probe)
    w = model.model.layers[1].mlp.down_proj.weight
    kept = w.to_local()[0, 3].item()
    if rank == 1:
        with torch.no_grad():
            w.to_local()[0, 3] = float("nan")
    try:
        loldu.inject(model, config("full"))
        error = None
    except Exception as e:  # reported to the test
        error = f"{type(e).__name__}: {e}"
    if rank == 1:
        with torch.no_grad():
            w.to_local()[0, 3] = kept
    try:
        loldu.inject(model, LoLDUConfig(rank=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
        saved_error = None
    except Exception as e:  # reported to the test
        saved_error = f"{type(e).__name__}: {e}"
    unchanged = not loldu.adapted_layers(model) and all(p.requires_grad for p in model.parameters())
    with open(os.path.join(out, f"refusal_rank{rank}.json"), "w") as f:
        json.dump({"error": error, "saved_error": saved_error, "unchanged": unchanged,
                   "same_forward": torch.equal(logits(model, probe), before)}, f)


def main() -> None:
    out, seed = sys.argv[1], int(sys.argv[2])
    names = sys.argv[3].split(",") if len(sys.argv) > 3 else list(SCENARIOS) + ["trainer", "refusals"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for name in names:
            if name == "trainer":
                trainer_run(seed, out, dist.get_rank())
            elif name == "refusals":
                refusals(seed, out, dist.get_rank())
            else:
                scenario(name, seed, out, dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
