"""`fgtrac influence --run R --from FILE.py:FUNCTION`: TracInCP (or TRAK) over a recorded run, from your own code.

FUNCTION (no arguments) returns what only the user's code knows: a dict with ``model`` (a fresh instance of
the trained architecture), ``loss_fn`` (per-sample losses), ``train`` and ``test`` as (inputs, targets),
``train_ids`` and ``test_ids`` (the samples' names, in order), and optionally ``layer``.
"""

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from ..attribution.methods import METHODS
from ..config import resolve_home
from ..errors import InputError

REQUIRED = ("model", "loss_fn", "train", "train_ids", "test", "test_ids")


def load_entry(spec: str):
    """Return the function named by 'path/to/file.py:function' or 'package.module:function'."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise InputError(f"--from {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"--from {spec!r}: no such file {target}")
        loader = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(loader)
        sys.path.insert(0, str(path.parent.resolve()))
        try:
            loader.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InputError(f"--from {spec!r}: {target} has no function {name}")
    return fn


def cmd_influence(args: argparse.Namespace) -> int:
    """Score the run's test samples, commit the top-k, and print each --test sample's proponents and opponents."""
    from ..ledger.audit import influence as audit_influence
    from ..ledger.store import Ledger
    from .scoring import influence

    inputs = load_entry(args.entry)()
    missing = [k for k in REQUIRED if k not in inputs]
    if missing:
        raise InputError(f"--from {args.entry}: the function's dict lacks {', '.join(missing)}")
    home = resolve_home(args.home)
    result = influence(args.run, inputs["model"], inputs["loss_fn"], inputs["train"], inputs["train_ids"],
                       inputs["test"], inputs["test_ids"], home=home, layer=args.layer or inputs.get("layer"),
                       k=args.top_k, method=args.method)
    print(f"{args.method} over {len(result.checkpoints)} checkpoint(s) of {result.training_run}"
          f"{' (replayed through every recorded step)' if METHODS[args.method].source == 'trace' else ''}: "
          f"{len(result.train_ids)} train x {len(result.test_ids)} test, committed at tree size "
          f"{result.commit.tree_size}", file=sys.stderr)
    from ..cli import _print_result

    for test in args.test or []:
        cols, rows = audit_influence(Ledger(home), test, result.training_run, args.method)
        print(f"test sample {test}:")
        _print_result(cols, rows, args.format)
    return 0


def add_influence_command(sub) -> None:
    """Add `fgtrac influence` to the command's subparsers."""
    p = sub.add_parser("influence", help="TracInCP over a recorded run's checkpoints, with your model and data")
    p.add_argument("--run", required=True, help="training run id, unique prefix, or 'latest'")
    p.add_argument("--from", dest="entry", required=True,
                   help="FILE.py:FUNCTION or MODULE:FUNCTION returning model, loss_fn, train, train_ids, test, test_ids")
    p.add_argument("--test", action="append", help="a test sample (name, id or prefix) whose scores to print")
    p.add_argument("--layer", help="score the gradient of this submodule only (default: the function's, or all)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--method", choices=list(METHODS), default="tracincp",
                   help="TracInCP (default) or TRAK over the recorded checkpoints, or step_exact or metagradient "
                        "replaying the recorded run")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_influence)
