"""A DDP training script run by torchrun in tests/session/test_ddp.py: `ddp_train.py HOME OUT [--untraced]`."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import fgtrac_assets as fg

N = 45  # odd: DistributedSampler pads one rank's share with a duplicate
NAMES = [f"item-{i}" for i in range(N)]


def dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.arange(N), torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g))


def main(home: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = dataset()
    sampler = DistributedSampler(data, shuffle=True, seed=7)
    truth = []
    with fg.track(NAMES, run="ddp-run", home=home) as run:
        loader, optimizer = run.loader(DataLoader(data, batch_size=5, sampler=sampler)), run.optimizer(optimizer)
        for epoch in range(2):
            sampler.set_epoch(epoch)
            for step, (i, x, y) in enumerate(loader):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                truth.append({"epoch": epoch, "step": step, "indices": i.tolist()})
            run.checkpoint(model.module, val_loss=1.0)
    with open(f"{out}/truth-{rank}.json", "w") as f:
        json.dump(truth, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
