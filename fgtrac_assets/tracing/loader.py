"""A DataLoader that says which samples each batch holds, for any dataset, sampler and worker setting.

The loader is rebuilt over the same dataset, sampler and options, with every item carrying its key (its
dataset index, or for an ``IterableDataset`` the id a key function gives it) through the workers and the
collate function: so the keys travel with the batch whatever the worker count, prefetching, persistence or
pinning, and the batches the loop receives are the ones the user's loader would have made.
"""

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data.distributed import DistributedSampler

BatchCallback = Callable[[list, "list[bool] | None"], None]


def with_index(index, item) -> tuple:
    """Return (index, item): how a traced loader's items carry their index."""
    return index, item


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are tag(index, item) (default: (index, item)); tag must pickle."""

    def __init__(self, inner, tag: Callable[[int, Any], Any] = with_index):
        self.inner, self.tag = inner, tag

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        return self.tag(index, self.inner[index])

    def __getitems__(self, indices):
        fetch = getattr(self.inner, "__getitems__", None)
        items = fetch(indices) if fetch else [self.inner[i] for i in indices]
        return [self.tag(i, item) for i, item in zip(indices, items)]


class _Keyed(IterableDataset):
    """An iterable dataset whose items are (key(item), item)."""

    def __init__(self, inner, key: Callable[[Any], str]):
        self.inner, self.key = inner, key

    def __iter__(self):
        for item in self.inner:
            yield self.key(item), item


class _KeepKeys:
    """A collate function that collates the items as the user's would and hands the keys beside them."""

    def __init__(self, collate, batched: bool):
        self.collate, self.batched = collate, batched

    def __call__(self, batch):
        if not self.batched:  # batch_size=None: one (key, item) at a time
            key, item = batch
            return [key], self.collate(item)
        return [k for k, _ in batch], self.collate([item for _, item in batch])


def _options(loader: DataLoader) -> dict:
    """Return the loader's worker, pinning and ordering options, to build an equivalent loader."""
    opts = {"num_workers": loader.num_workers, "pin_memory": loader.pin_memory, "timeout": loader.timeout,
            "worker_init_fn": loader.worker_init_fn, "multiprocessing_context": loader.multiprocessing_context,
            "generator": loader.generator, "pin_memory_device": loader.pin_memory_device}
    if loader.num_workers > 0:
        opts.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    if hasattr(loader, "in_order"):
        opts["in_order"] = loader.in_order
    return opts


def keyed_loader(loader: DataLoader, key: Callable[[Any], str] | None = None) -> DataLoader:
    """Return a loader making the same batches as `loader`, each as (keys, batch)."""
    dataset, opts = loader.dataset, _options(loader)
    if isinstance(dataset, IterableDataset):
        if key is None:
            raise TypeError("an IterableDataset has no indices: pass key=, a function giving each item's sample id")
        batched = loader.batch_size is not None
        return DataLoader(_Keyed(dataset, key), batch_size=loader.batch_size, drop_last=loader.drop_last,
                          collate_fn=_KeepKeys(loader.collate_fn, batched), **opts)
    if loader.batch_sampler is None:  # batch_size=None: the sampler's indices, one item at a time
        return DataLoader(IndexedDataset(dataset), sampler=loader.sampler, batch_size=None,
                          collate_fn=_KeepKeys(loader.collate_fn, False), **opts)
    return DataLoader(IndexedDataset(dataset), batch_sampler=loader.batch_sampler,
                      collate_fn=_KeepKeys(loader.collate_fn, True), **opts)


class TracedLoader:
    """Iterates like the user's DataLoader; tells `on_batch` the keys of each batch (and which are padding).

    Each iteration is one epoch (``on_epoch`` is called at its first batch). Attributes not defined here (``dataset``,
    ``sampler``, ``batch_size``, …) are the user's loader's, so its sampler's ``set_epoch`` keeps working.
    A ``deferred`` loader tells `on_batch` only when ``consumed()`` is called, oldest batch first: for
    trainers that fetch batches ahead of the step that trains them (a ``None`` batch, which trainers skip,
    is never reported; batches of an epoch left unconsumed are forgotten at the next ``iter()``).
    """

    def __init__(self, loader: DataLoader, on_batch: BatchCallback, on_epoch: Callable[[], None],
                 key: Callable[[Any], str] | None = None, deferred: bool = False):
        self.loader = loader
        self._keyed = keyed_loader(loader, key)
        self._on_batch, self._on_epoch = on_batch, on_epoch
        self._waiting: deque | None = deque() if deferred else None
        sampler = loader.sampler
        self._distributed = sampler if isinstance(sampler, DistributedSampler) else None

    def __iter__(self) -> Iterator:
        # made now, as iter() on the user's loader would (workers start, seeds are drawn); the epoch begins
        # at its first batch, so an iterator a trainer makes and drops is no epoch
        return self._batches(iter(self._keyed))

    def _batches(self, keyed: Iterator) -> Iterator:
        self._on_epoch()
        if self._waiting is not None:
            self._waiting.clear()
        seen = 0
        for keys, batch in keyed:
            padding = self._padding(seen, len(keys))
            seen += len(keys)
            if self._waiting is None:
                self._on_batch(keys, padding)
            elif batch is not None:
                self._waiting.append((keys, padding))
            yield batch

    def consumed(self) -> None:
        """Report the oldest batch handed out and not yet reported (deferred loaders only)."""
        if not self._waiting:
            raise RuntimeError("consumed(): no batch handed out is waiting (is the loader deferred?)")
        self._on_batch(*self._waiting.popleft())

    def _padding(self, start: int, n: int) -> list[bool] | None:
        """Return which of the epoch's items start..start+n are DistributedSampler's padding (None: none can be)."""
        s = self._distributed
        if s is None or s.drop_last:
            return None
        size = len(s.dataset)
        return [s.rank + (start + i) * s.num_replicas >= size for i in range(n)]

    def __len__(self) -> int:
        return len(self._keyed)

    def __getattr__(self, name):
        return getattr(self.loader, name)
