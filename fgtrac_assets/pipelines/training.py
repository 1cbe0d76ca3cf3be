"""A plain supervised SGD loop over tensors, reporting each batch to a Recorder."""

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, TensorDataset

from ..attribution.model_calls import model_device
from ..tracing.recorder import Recorder
from .base import EpochResult, TrainSettings, resolve_device


def lr_at(settings: TrainSettings, epoch: int) -> float:
    """Return the learning rate of an epoch under the run's schedule."""
    if settings.schedule == "constant":
        return settings.lr
    return 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / settings.epochs))


def cpu_state_dict(model) -> dict:
    """Return a copy of the model's state_dict on the CPU: a checkpoint written on a GPU machine loads anywhere."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def mean_loss(model, loss_fn, inputs, targets, batch_size: int = 1024) -> float:
    """Return the mean per-sample loss of a model over tensors (moved batch by batch to the model's device)."""
    if len(inputs) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = model_device(model)
    total = 0.0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
        total += float(loss_fn(model(x), y).sum())
    model.train(was_training)
    return total / len(inputs)


class EvenBatches:
    """A batch sampler: every epoch a fresh permutation of n samples cut into ceil(n / batch_size) near-equal batches.

    Batch sizes differ by at most one and none exceeds batch_size. Cutting full batches and a remainder instead can
    end an epoch on a tiny batch: 1,249 digits in batches of 32 leave one sample, and a whole SGD step on that single
    sample's mean loss (at the full lr) undid the epoch's training.
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.n == 0:
            return
        order = torch.randperm(self.n, generator=self.generator)
        for batch in order.tensor_split(len(self)):
            yield batch.tolist()


def train_supervised(model, loss_fn, train: tuple, val: tuple, settings: TrainSettings,
                     recorder: Recorder, make_optimizer=None) -> Iterator[EpochResult]:
    """Train on (inputs, targets), one recorded step per near-equal batch; yield each epoch's result.

    ``make_optimizer(parameters, lr)`` builds the optimiser (default: plain SGD).

    The model is moved to ``settings.device`` (in place, as ``nn.Module.to`` does) and each batch follows it;
    the data stays where it is, the recorder gets each batch's sample indices as a CPU tensor and every
    epoch's state_dict is a CPU copy.
    """
    settings.validate()
    device = torch.device(resolve_device(settings.device))
    model.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    n = len(train[1])
    # the dataset yields each sample's index with it, so every batch says which samples it holds
    batches = EvenBatches(n, settings.batch_size, generator)
    loader = DataLoader(TensorDataset(torch.arange(n), *train), batch_sampler=batches)
    optimizer = (make_optimizer or torch.optim.SGD)(model.parameters(), lr=settings.lr)
    model.train()
    for epoch in range(settings.epochs):
        lr = lr_at(settings, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        recorder.start_epoch(epoch)
        for indices, x, y in loader:  # indices come from the CPU sampler and stay there, for the recorder
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            recorder.record_batch(indices, lr)
            optimizer.step()
        yield EpochResult(epoch=epoch, step=recorder.step, lr=optimizer.param_groups[0]["lr"],
                          train_loss=mean_loss(model, loss_fn, *train), val_loss=mean_loss(model, loss_fn, *val),
                          state_dict=cpu_state_dict(model))
