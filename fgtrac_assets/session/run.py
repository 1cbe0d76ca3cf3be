"""A recorded training run from the user's own loop: what it commits is what the pipelines commit.

``fg.track(sample_ids, run=..., home=...)`` yields a :class:`Run`. Its loader and optimizer hooks record
which samples every step used (tracing/loader.py, tracing/steps.py); ``checkpoint`` saves the model with its
sha256; leaving the ``with`` block commits, in one signed commit: the samples (and `ingested` events for
new ones), one event group per step, the training set, the checkpoints, the optimizer steps with every
parameter group's lr, the run's sampler and optimizers, and the weights before the first step (artifact
``initial_weights``, kept once ``run.checkpoint(model)`` has named the parameters): what the replay methods
(step_exact, metagradient) need to re-run it. An exception inside the block commits nothing
and removes the checkpoint files it wrote. Under torch.distributed every rank records its own batches and
rank 0 commits them all, one event group per global step.
"""

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..errors import InputError
from ..ledger.artifacts import INITIAL_WEIGHTS, checkpoint_dir, initial_weights_path, write_artifact
from ..ledger.proofs import training_set_root
from ..ledger.store import Commit, CommitResult, Ledger
from ..tracing.events import EventBuffer
from ..tracing.groups import GroupLog
from ..tracing.steps import StepRecorder, as_indices
from . import distributed
from .ids import check_names, sample_id

ASSET = "training_checkpoints"


class SessionError(InputError):
    """A session used in a way it cannot record correctly."""


class Run:
    """One training run being recorded: wrap the loader and optimizer, save checkpoints, commit on exit."""

    def __init__(self, sample_ids: Sequence[str] | None, run: str, home=None, pipeline: str = "own_training"):
        if not isinstance(run, str) or not run:
            raise SessionError(f"run {run!r}: give the training run a name")
        self.training_run, self.pipeline = run, pipeline
        self.ledger = Ledger(home)
        self.names: list[str] = check_names(sample_ids, None) if sample_ids is not None else []
        self._given = sample_ids is not None
        self._index = {n: i for i, n in enumerate(self.names)}
        self.recorder = StepRecorder(GroupLog())
        self.checkpoints: list[dict] = []
        self._artifacts: list = []
        self._files: list[Path] = []
        self._param_names: dict[int, str] = {}
        self._initial: dict[int, Any] = {}  # id(parameter) -> its value before the first step (CPU copy)
        self._initial_hooks: list = []
        self._sampler: dict | None = None
        self.rank, self.world_size = distributed.rank_and_size()
        self.result: CommitResult | None = None
        if self.ledger.has_training_run(run):
            raise SessionError(f"training run {run!r} is already in the ledger at {self.ledger.home.root}; "
                               "give this run a new name")

    # -- wrapping
    def loader(self, loader, key: Callable[[Any], str] | None = None, deferred: bool = False):
        """Return a loader yielding the same batches while recording which samples each holds.

        ``deferred=True`` (for trainers that fetch ahead): a batch is recorded when ``loader.consumed()`` is
        called, just before the trainer trains on it, not when it is handed out.
        """
        from torch.utils.data import IterableDataset

        from ..tracing.loader import TracedLoader

        iterable = isinstance(loader.dataset, IterableDataset)
        if iterable and key is None:
            raise SessionError("an IterableDataset has no indices: pass key=, a function giving each item's "
                               "sample id, e.g. run.loader(loader, key=lambda item: item['id'])")
        if not iterable:
            if not self._given:
                raise SessionError("give fg.track the sample ids (one per dataset item, in dataset order)")
            check_names(self.names, len(loader.dataset))
        self._note_sampler(loader.sampler)
        on_batch = self._keyed_batch if key is not None else self._indexed_batch
        return TracedLoader(loader, on_batch, lambda: self._epoch(loader.sampler), key, deferred)

    def optimizer(self, optimizer):
        """Hook the optimizer's steps (the same object comes back, so LR schedulers keep working on it)."""
        self._initial_hooks.append(optimizer.register_step_pre_hook(self._keep_initial))
        return self.recorder.attach(optimizer)

    def _keep_initial(self, optimizer, args, kwargs) -> None:
        """Before an optimizer's first step: copy the parameters it is about to change (once each)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in self._initial:
                    self._initial[id(p)] = p.detach().to("cpu", copy=True)

    def scaler(self, scaler):
        """Let a torch.amp.GradScaler's skipped steps (inf/NaN gradients) be recorded as skipped; same object back."""
        return self.recorder.attach_scaler(scaler)

    # -- the Recorder contract (tracing/recorder.py), for loops that report their steps themselves
    @property
    def step(self) -> int:
        """The number of optimizer steps recorded so far."""
        return self.recorder.step

    def start_epoch(self, epoch: int) -> None:
        """Mark the start of an epoch (loops reporting steps themselves; a traced loader does it per iter)."""
        self.recorder.epoch = epoch

    def record_batch(self, indices, lr: float, details=None) -> None:
        """Record one step a loop reports itself: the dataset indices of its batch and the lr it applies."""
        if not self._given:
            raise SessionError("record_batch takes dataset indices: give fg.track the sample ids")
        self.recorder.record_step(as_indices(indices), lr, details() if callable(details) else details)

    def record(self, kind: str, indices, details=None, whole_run: bool = False) -> None:
        """Record one event of `kind` per sample at these indices, in this epoch or for the whole run."""
        self.recorder.log.add(kind, as_indices(indices), epoch=None if whole_run else self.recorder.epoch,
                              details=details() if callable(details) else details)

    # -- for trainers that carry the dataset indices with their batches (no traced loader)
    def batch(self, indices: Sequence[int]) -> None:
        """Record a batch the loop is about to train on, by the dataset indices of its items."""
        if not self._given:
            raise SessionError("give fg.track the sample ids (one per dataset item, in dataset order)")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self.names)):
            raise SessionError(f"batch indices {idx.min()}..{idx.max()}: the run has {len(self.names)} sample ids")
        self._indexed_batch(idx.tolist(), None)

    def next_epoch(self, sampler=None) -> None:
        """Begin the next epoch of batches reported with ``batch`` (a traced loader does this on every iter)."""
        if sampler is not None and self._sampler is None:
            self._note_sampler(sampler)
        self._epoch(sampler)

    # -- what the hooks report
    def _indexed_batch(self, keys: list, padding: list[bool] | None) -> None:
        self.recorder.batch(np.asarray(keys, dtype=np.int64), self._details(len(keys), padding))

    def _keyed_batch(self, keys: list, padding: list[bool] | None) -> None:
        idx = np.fromiter((self._intern(k) for k in keys), dtype=np.int64, count=len(keys))
        self.recorder.batch(idx, self._details(len(keys), padding))

    def _intern(self, name) -> int:
        i = self._index.get(name)
        if i is None:
            if not isinstance(name, str) or not name:
                raise SessionError(f"key function gave {name!r} for an item: a sample id must be a non-empty text")
            i = self._index[name] = len(self.names)
            self.names.append(name)
        return i

    def _details(self, n: int, padding: list[bool] | None) -> list[str] | None:
        if self.world_size == 1:
            return None
        plain = json.dumps({"rank": self.rank})
        padded = json.dumps({"padding": True, "rank": self.rank})
        return [plain] * n if padding is None else [padded if p else plain for p in padding]

    def _epoch(self, sampler) -> None:
        self.recorder.start_epoch()
        if self._sampler is not None and "epochs" in self._sampler:
            self._sampler["epochs"].append(int(getattr(sampler, "epoch", 0)))

    def _note_sampler(self, sampler) -> None:
        from torch.utils.data.distributed import DistributedSampler

        if isinstance(sampler, DistributedSampler):
            noted = {"class": "DistributedSampler", "num_replicas": sampler.num_replicas, "shuffle": sampler.shuffle,
                     "seed": sampler.seed, "drop_last": sampler.drop_last, "dataset_size": len(sampler.dataset)}
            if self._sampler is not None and {k: v for k, v in self._sampler.items() if k != "epochs"} == noted:
                return  # the same sampler's loader wrapped again (reloaded each epoch): keep its epochs
            self._sampler = {**noted, "epochs": []}
        else:
            self._sampler = {"class": type(sampler).__name__}

    # -- checkpoints
    def checkpoint(self, model, val_loss: float | None = None, train_loss: float | None = None) -> str:
        """Save the model's state (CPU tensors) with its sha256 and the lrs of the last step; return its id."""
        import torch

        step = self.recorder.step
        cid = f"{self.training_run}/step-{step:07d}"
        if any(c["checkpoint_id"] == cid for c in self.checkpoints):
            raise SessionError(f"checkpoint {cid}: already saved at this step (one checkpoint per step)")
        self._param_names.update({id(p): name for name, p in model.named_parameters()})
        row = {"checkpoint_id": cid, "epoch": self.recorder.epoch, "step": step, "lr": self._last_lr(),
               "train_loss": _finite(train_loss, "train_loss"), "val_loss": _finite(val_loss, "val_loss"),
               "path": None, "sha256": None}
        if self.rank == 0:
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            rel = f"{checkpoint_dir(self.pipeline, self.training_run)}/step-{step:07d}.pt"
            art = write_artifact(self.ledger.ensure_home().root, rel, "checkpoint", lambda p: torch.save(state, p))
            self._files.append(self.ledger.home.root / rel)
            self._artifacts.append(art)
            row.update(path=art.path, sha256=art.sha256)
        self.checkpoints.append(row)
        return cid

    def set_losses(self, checkpoint_id: str, val_loss: float | None = None, train_loss: float | None = None) -> None:
        """Set a saved checkpoint's losses known only after it was saved (None leaves a loss as it is)."""
        row = next((c for c in self.checkpoints if c["checkpoint_id"] == checkpoint_id), None)
        if row is None:
            raise SessionError(f"checkpoint {checkpoint_id}: not saved in this run")
        for name, value in (("val_loss", val_loss), ("train_loss", train_loss)):
            if value is not None:
                row[name] = _finite(value, name)

    def _last_lr(self) -> float | None:
        applied = [r for r in self.recorder.rows if r.applied and r.lrs]
        lrs = applied[-1].lrs if applied else self.recorder.current_lrs()
        return lrs[min(lrs)][0] if lrs else None

    # -- commit
    def commit(self) -> CommitResult | None:
        """Commit everything recorded, in one signed commit (rank 0 under torch.distributed); return its result."""
        self.recorder.finish()
        self._unhook()
        mine = distributed.Share(self.names, self.recorder.log, self.recorder.rows, self._sampler)
        shares = distributed.gather(mine, self.world_size)
        if self.rank != 0:
            distributed.barrier(self.world_size)
            return None
        names, log = distributed.merge(shares)
        if self._sampler and self._sampler.get("class") == "DistributedSampler" and self._given:
            self._artifacts.append(distributed.write_dataset_order(self.ledger, self.pipeline, self.training_run,
                                                                   [sample_id(n) for n in self.names]))
        self._write_initial()
        self.result = self.ledger.commit(self._commit(names, log))
        distributed.barrier(self.world_size)
        return self.result

    def _commit(self, names: list[str], log: GroupLog) -> Commit:
        ids = [sample_id(n) for n in names]
        groups = log.build(self.training_run, pa.array(ids, pa.string()))
        used = sorted(ids[j] for j in log.trained_indices().tolist())
        rows = {
            **new_sample_rows(self.ledger, self.pipeline, ids, names),
            "checkpoints": self.checkpoints,
            "training_sets": [{"size": len(used), "root": training_set_root(used).hex()}],
            "artifacts": [a.row() for a in self._artifacts],
            "training_runs": [{"world_size": self.world_size, "sampler": json.dumps(self._sampler, sort_keys=True),
                               "optimizers": json.dumps(self._optimizers(), sort_keys=True)}],
            "optimizer_steps": [{"step": r.step, "epoch": r.epoch, "applied": r.applied,
                                 "lrs": json.dumps({str(k): v for k, v in sorted(r.lrs.items())}),
                                 "samples": r.samples, "micro_batches": r.micro_batches}
                                for r in self.recorder.rows],
        }
        return Commit(pipeline=self.pipeline, asset=ASSET, run_id=self.training_run, training_run=self.training_run,
                      rows=rows, groups=groups)

    def _optimizers(self) -> list[dict]:
        """Return each attached optimizer's class and parameter groups (parameter names, scalar hyperparameters)."""
        out = []
        for opt in self.recorder.optimizers:
            groups = []
            for g in opt.param_groups:
                hyper = {k: v for k, v in g.items() if k not in ("params", "lr") and isinstance(v, (int, float, bool, str))}
                hyper.update({k: [float(x) for x in v] for k, v in g.items()  # Adam's betas
                              if isinstance(v, (tuple, list)) and v and all(isinstance(x, (int, float)) for x in v)})
                names = [self._param_names.get(id(p), f"#{n}") for n, p in enumerate(g["params"])]
                groups.append({"parameters": names, **hyper})
            out.append({"class": type(opt).__name__, "groups": groups})
        return out

    def _write_initial(self) -> None:
        """Write the weights before the first step, by parameter name, when every parameter has a name."""
        if not self._initial or not set(self._initial) <= set(self._param_names):
            return  # never stepped, or run.checkpoint(model) never named the parameters
        import torch

        state = {self._param_names[i]: t for i, t in self._initial.items()}
        rel = initial_weights_path(self.pipeline, self.training_run)
        art = write_artifact(self.ledger.ensure_home().root, rel, INITIAL_WEIGHTS, lambda p: torch.save(state, p))
        self._files.append(self.ledger.home.root / rel)
        self._artifacts.append(art)

    def _unhook(self) -> None:
        self.recorder.detach()
        for handle in self._initial_hooks:
            handle.remove()
        self._initial_hooks.clear()

    def discard(self) -> None:
        """Forget the run: unhook the optimizers and remove the checkpoint files it wrote (nothing is committed)."""
        self._unhook()
        for f in self._files:
            f.unlink(missing_ok=True)


def new_sample_rows(ledger: Ledger, pipeline: str, ids: Sequence[str], names: Sequence[str]) -> dict:
    """Return `samples` rows and `ingested` events for the named samples the pipeline has not recorded before."""
    known = ledger.known_samples(pipeline, list(ids))
    fresh = [(i, n) for i, n in dict(zip(ids, names)).items() if i not in known]
    ingested = EventBuffer()
    ingested.add([i for i, _ in fresh], "ingested", detail=[{"source": n} for _, n in fresh])
    return {"samples": [{"sample_id": i, "source": n, "label": None} for i, n in fresh], "events": ingested.to_arrow()}


def _finite(value, name: str) -> float | None:
    import math

    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        raise SessionError(f"checkpoint {name} is {v}: the ledger stores finite numbers only")
    return v


@contextlib.contextmanager
def track(sample_ids: Sequence[str] | None, run: str, home=None, pipeline: str = "own_training") -> Iterator[Run]:
    """Record a training run from a plain loop; commit it when the block ends, nothing if it raises."""
    session = Run(sample_ids, run, home, pipeline)
    try:
        yield session
    except BaseException:
        session.discard()
        raise
    session.commit()
