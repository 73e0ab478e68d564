"""FSDP2: two CPU ranks (torchrun, gloo) shard a tiny random Llama, inject LoLDU into the sharded model,
train it on halves of each global batch, save from rank 0, merge and unmerge on the shards
(tests/fsdp_worker.py). Checked here against one process: the same losses and trained z as training
on the whole batches, no rank holding any layer's factors whole, the saved adapter reloading onto a
plain model with the same outputs."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

import loldu  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fsdp_worker as W  # noqa: E402

# Bounds, and why they are not 0. The sharded factorization takes PL, D and the pivots from the panel's
# LU (the same kernel and numbers as one process) but U from its own triangular solve on the pivot rows,
# and the ranks' gradients are summed in another order: fp32 rounding. Measured over four seeds (fp32,
# three SGD steps): losses within 1e-7 relative, z within 1.9e-6 ("lu", full rank; 6e-8 at rank 4) where
# training moved z by 5e-2 to 3e-1, logits of the reloaded, merged and unloaded models within 1.6e-6 of
# max |logits|. The bounds leave about 5x; training must move z by 1000x the z bound.
LOSS_RTOL = 1e-5
Z_ATOL = 1e-5  # z is O(1) (it starts at the pivots D), three SGD steps (fsdp_worker.SGD_LR)
LOGIT_RTOL = 1e-5  # of max |logits|: two routes through the same fp32 model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    seed = int(torch.randint(0, 2**31, ()))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "fsdp_worker.py"), str(out), str(seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, seed


def reference(name: str, seed: int):
    """One process, the whole global batch per step: the losses and the trained adapter."""
    model = loldu.inject(W.llama(seed), W.config(name))
    opt = torch.optim.SGD(loldu.trainable_parameters(model), lr=W.SGD_LR)
    losses = []
    for ids in W.batches(seed)[:W.STEPS]:
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, W.adapter_state(model)


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_training_under_fsdp_equals_one_process(run, name):
    out, seed = run
    report = json.loads((out / f"{name}_report.json").read_text())
    z0, z1 = (load_file(out / f"{name}_z_rank{r}.safetensors") for r in range(2))
    for k in z0:
        assert torch.equal(z0[k], z1[k]), k  # every rank takes the same step
    losses, ref = reference(name, seed)
    init = W.adapter_state(loldu.inject(W.llama(seed), W.config(name)))
    torch.testing.assert_close(torch.tensor(report["losses"]), torch.tensor(losses), rtol=LOSS_RTOL, atol=0)
    assert z0.keys() == ref.keys()
    for k in ref:
        assert not torch.equal(ref[k], init[k]), k  # training moved every z and sigma
        torch.testing.assert_close(z0[k], ref[k], rtol=0, atol=Z_ATOL)
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) >= 1000 * Z_ATOL  # the bound is far below a step


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_no_rank_holds_a_whole_factor(run, name):
    out, _ = run
    holdings = json.loads((out / f"{name}_report.json").read_text())["holdings"]
    assert len(holdings) == 2 * len(W.SCENARIOS[name][2])
    for layer, h in holdings.items():
        assert h["is_dtensor"], layer
        assert h["held"] <= (h["whole"] + 1) // 2 + 64, (layer, h)  # half the rows (chunks pad to whole rows)
        assert h["held"] < h["whole"], (layer, h)
        assert h["largest_buffer"] <= 96, (layer, h)  # D, pivots, perm: vectors, never a (d, r) matrix


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_saved_adapter_reloads_in_one_process(run, name):
    out, seed = run
    logits = load_file(out / f"{name}_logits.safetensors")
    plain = W.llama(seed)
    loldu.load_adapter(plain, out / f"{name}_adapter")
    with torch.no_grad():
        got = plain(logits["probe"]).logits
    scale = float(logits["trained"].abs().max())
    assert float((got - logits["trained"]).abs().max()) <= LOGIT_RTOL * scale
    assert float((logits["trained"] - logits["base"]).abs().max()) > 1e-3 * scale  # the adapter changed outputs


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_merge_unmerge_and_unload_on_shards(run, name):
    out, _ = run
    logits = load_file(out / f"{name}_logits.safetensors")
    report = json.loads((out / f"{name}_report.json").read_text())
    scale = float(logits["trained"].abs().max())
    for k in ("merged", "unmerged", "unloaded"):
        assert float((logits[k] - logits["trained"]).abs().max()) <= LOGIT_RTOL * scale, k
    # At c == 0 the injected model computes the base model's outputs ("lu": within the LU's rounding).
    assert float((logits["init"] - logits["base"]).abs().max()) <= LOGIT_RTOL * scale
    assert report["plain_after_unload"]


def test_trainer_under_fsdp2_writes_adapter_only_checkpoints(run):
    out, seed = run
    z0, z1 = (load_file(out / f"trainer_z_rank{r}.safetensors") for r in range(2))
    init = W.adapter_state(loldu.inject(W.llama(seed), W.config("full")))
    for k in z0:
        assert torch.equal(z0[k], z1[k]), k
    assert any(not torch.equal(z0[k], init[k]) for k in z0)  # the Trainer's steps moved the adapter
    ckpt = out / "trainer" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in names and "trainer_state.json" in names
    assert not names & {"model.safetensors", "pytorch_model.bin", "config.json"}  # no base weight written
    plain = W.llama(seed)
    loldu.load_adapter(plain, ckpt)
    with torch.no_grad():
        got = plain(W.batches(seed)[-1]).logits
    want = load_file(out / "trainer_logits.safetensors")["trained"]
    assert float((got - want).abs().max()) <= LOGIT_RTOL * float(want.abs().max())


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_second_adapter_rows_and_disabled_on_shards(run, name):
    out, _ = run
    logits = load_file(out / f"{name}_logits.safetensors")
    scale = float(logits["trained"].abs().max())

    def close(a, b):
        return float((a - b).abs().max()) <= LOGIT_RTOL * scale

    assert close(logits["other"], logits["base"])  # a new adapter starts at c == 0
    assert close(logits["disabled"], logits["base"])
    rows, want = logits["rows"], [logits["trained"], logits["other"], logits["base"], logits["trained"]]
    for i, w in enumerate(want):
        assert close(rows[i], w[i]), i


@pytest.mark.parametrize("name", list(W.SCENARIOS))
def test_saved_adapter_loads_onto_a_sharded_model(run, name):
    out, _ = run
    report = json.loads((out / f"{name}_report.json").read_text())
    assert report["load_sharded_error"] is None, report["load_sharded_error"]
    logits = load_file(out / f"{name}_logits.safetensors")
    scale = float(logits["trained"].abs().max())
    assert float((logits["loaded_sharded"] - logits["trained"]).abs().max()) <= LOGIT_RTOL * scale


@pytest.mark.parametrize("d,k,r", [(40, 24, 5), (24, 40, 24), (40, 24, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_factor_panel_matches_the_whole_lu(d, k, r, dtype):
    """What every rank computes from the panel and the pivot rows against an independent oracle: the fp64
    LU with partial pivoting of the whole weight (torch.linalg.lu), truncated to r components."""
    from loldu.distributed import factor_panel

    W = torch.randn(d, k, dtype=torch.float64).to(dtype)
    got = factor_panel(W[:, :r].contiguous(), lambda piv: W.index_select(0, piv), r, "partial")
    P, L, U = torch.linalg.lu(W.to(torch.float64))
    perm = P.t().argmax(1)  # row i of P^T W is W[perm[i]]
    assert torch.equal(got.pivots, perm[:r])
    D = U.diagonal()[:r]
    want_PL = (P @ L)[:, :r]
    want_U = U[:r] / D[:, None]
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4}[dtype]  # the panel is exact in bf16
    torch.testing.assert_close(got.PL.double(), want_PL, rtol=0, atol=tol)
    torch.testing.assert_close(got.D.double(), D, rtol=tol, atol=tol)
    torch.testing.assert_close(got.U.double(), want_U, rtol=0, atol=tol * float(want_U.abs().max()))


class _FakeTrainer:
    """Stands in for transformers.Trainer after its __init__: the flags LoLDUTrainerMixin reads."""

    def __init__(self, model=None, fsdp=False, deepspeed=False, **_):
        self.model, self.is_fsdp_enabled, self.is_deepspeed_enabled = model, fsdp, deepspeed


@pytest.mark.parametrize("flag,says", [("fsdp", "fsdp arguments"), ("deepspeed", "DeepSpeed is not supported")])
def test_trainer_refuses_accelerate_fsdp_and_deepspeed_naming_fsdp2(flag, says):
    from loldu.errors import AdapterError
    from loldu.trainer import LoLDUTrainerMixin

    class T(LoLDUTrainerMixin, _FakeTrainer):
        pass

    model = loldu.inject(W.llama(0), W.config("full"))
    with pytest.raises(AdapterError, match=says) as e:
        T(model=model, **{flag: True})
    assert "fully_shard" in str(e.value) and "docs/distributed.md" in str(e.value)


def test_refusals_on_shards_leave_the_model_unchanged(run):
    """A NaN in one rank's shard only, refused alike by every rank naming the layer; modules_to_save on a
    sharded model, refused naming the module."""
    out, _ = run
    reports = [json.loads((out / f"refusal_rank{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert rep["error"] is not None and rep["error"].startswith("AdapterError")
        assert "model.layers.1.mlp.down_proj" in rep["error"] and "NaN" in rep["error"]
        assert rep["saved_error"] is not None and rep["saved_error"].startswith("AdapterError")
        assert "'lm_head' (modules_to_save)" in rep["saved_error"] and "sharded" in rep["saved_error"]
        assert rep["unchanged"] and rep["same_forward"]
    assert reports[0]["error"] == reports[1]["error"]


def test_trainer_resumes_a_sharded_model_from_its_adapter_checkpoint(run):
    out, _ = run
    for r in range(2):
        assert json.loads((out / f"trainer_resume_rank{r}.json").read_text())["global_step"] == 3
    assert (out / "trainer" / "checkpoint-3" / "adapter_model.safetensors").is_file()
