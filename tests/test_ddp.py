"""DDP: two CPU processes (gloo) train a LoLDU model on different data and end with identical z,
equal to one process training on both shards (DDP averages the gradients of z)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file, save_file

import loldu
from loldu import LoLDUConfig

WORLD, STEPS, LR = 2, 3, 0.05

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


def _base(seed):
    torch.manual_seed(seed)  # same base weights in every process
    return Net()


def build(seed):
    return loldu.inject(_base(seed), LoLDUConfig(rank=4, target_modules=["emb", "fc1", "fc2"], train_scale=True))


def shard(rank, data_seed):
    g = torch.Generator().manual_seed(data_seed + rank)
    return [(torch.randint(0, 50, (6, 5), generator=g), torch.randn(6, 4, generator=g)) for _ in range(STEPS)]


def z_state(model):
    return {f"{n}.{k}": p.detach().clone() for n, l in loldu.adapted_layers(model)
            for k, p in (("z", l.loldu_z["default"]), ("sigma", l.loldu_sigma["default"]))}


def _worker(rank, init_file, out_dir, seed, data_seed):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = build(seed)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(loldu.trainable_parameters(ddp), lr=LR)
        for ids, target in shard(rank, data_seed):
            opt.zero_grad()
            nn.functional.mse_loss(ddp(ids), target).backward()
            opt.step()
        save_file(z_state(ddp), os.path.join(out_dir, f"rank{rank}.safetensors"))
        if rank == 0:
            loldu.save_adapter(ddp, os.path.join(out_dir, "adapter"))  # names as in the unwrapped model
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_hold_identical_z(tmp_path):
    seed, data_seed = int(torch.randint(0, 2**31, ())), int(torch.randint(0, 2**31, ()))
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), seed, data_seed), nprocs=WORLD, join=True)
    z0, z1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD))
    assert z0.keys() == z1.keys() and len(z0) == 6
    for k in z0:
        assert torch.equal(z0[k], z1[k]), k

    # Oracle: one process, same init, the loss averaged over both shards per step.
    model = build(seed)
    init = z_state(model)
    opt = torch.optim.AdamW(loldu.trainable_parameters(model), lr=LR)
    shards = [shard(r, data_seed) for r in range(WORLD)]
    for step in range(STEPS):
        opt.zero_grad()
        loss = sum(nn.functional.mse_loss(model(*s[step][:1]), s[step][1]) for s in shards) / WORLD
        loss.backward()
        opt.step()
    ref = z_state(model)
    for k in z0:
        assert not torch.equal(z0[k], init[k]), k  # training did move z and sigma
        torch.testing.assert_close(z0[k], ref[k], rtol=1e-5, atol=1e-6)

    plain = _base(seed)
    loldu.load_adapter(plain, tmp_path / "adapter")
    for k, v in z_state(plain).items():
        assert torch.equal(v, z0[k]), k
