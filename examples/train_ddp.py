"""Data-parallel SNOpt on digits.

CPU (gloo): torchrun --nproc-per-node 2 examples/train_ddp.py
GPUs (nccl): torchrun --nproc-per-node 8 examples/train_ddp.py
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import snopt
from snopt.data import load_digits


class Field(nn.Module):
    """Two 3×3 convolutions with a tanh between them."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """dx/dt."""
        return self.c2(torch.tanh(self.c1(x)))


def main() -> None:
    """Train for three epochs; rank 0 prints the test accuracy."""
    gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),
                          snopt.ODEBlock(Field(), method="rk4", options={"step_size": 0.25}),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).to(device)
    ddp = DDP(model, device_ids=[device.index] if gpu else None)
    opt = snopt.SNOpt(ddp, torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9), update_freq=20)
    data = load_digits()
    train = TensorDataset(data.x_train, data.y_train)
    global_batch = 128
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=global_batch // world, sampler=sampler, drop_last=True)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(ddp(x.to(device)), y.to(device))
            loss.backward()
            opt.step()
        if rank == 0:
            with torch.no_grad():
                acc = (model(data.x_test.to(device)).argmax(1).cpu() == data.y_test).float().mean()
            print(f"epoch {epoch}: loss {loss.item():.3f}, test accuracy {acc:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
