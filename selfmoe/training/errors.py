"""The one kind of error a user's input raises: printed as `error: <what>: <file>: <why>`, exit 2.

Every file the user hands the trainer (checkpoints, DeepSpeed JSON, data) is checked where it is
opened; whatever goes wrong there becomes an InputError, so pretrain_gpt.py has one place that
turns it into one line on stderr. Library errors arrive with multi-line messages and sometimes
as BaseException (torch's dist-checkpoint CheckpointException), hence `one_line` and `reraise_as`.
"""

from __future__ import annotations

import contextlib
import os
import sys


class InputError(RuntimeError):
    """A file or value given by the user that this run cannot use; str() is one line.

    InputError(what, path, why) reads `what: path: why`; with one argument, that text as is.
    """

    def __init__(self, what: str, path: str | None = None, why: str | None = None):
        parts = [what] + [str(p) for p in (path, why) if p]
        super().__init__(one_line(": ".join(parts)))


def one_line(e) -> str:
    """An exception (or text) as one line of at most 400 characters."""
    text = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


@contextlib.contextmanager
def reraise_as(what: str, path: str):
    """Turn any failure inside the block into InputError(what, path, <the failure in one line>).

    Catches BaseException minus interrupts and exits: torch.distributed.checkpoint's
    CheckpointException derives from BaseException, so `except Exception` would let it through.
    """
    try:
        yield
    except (KeyboardInterrupt, SystemExit, InputError):
        raise
    except BaseException as e:  # noqa: BLE001 - see the docstring
        raise InputError(what, path, _why(e)) from None


def _why(e: BaseException) -> str:
    failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        rank, err = next(iter(failures.items()))
        err = err[0] if isinstance(err, tuple) else err
        return f"{_why(err)} (rank {rank})"
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__  # e.g. EOFError from a truncated file
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def run_or_exit(train, data_errors: tuple = (), describe=str):
    """Run `train()` and return what it returns; what the user can act on ends the process in one
    line on stderr (rank 0): an InputError, or one of `data_errors` (as `describe(e)` says it),
    exits 2 like a usage error; a diverged run (the trainer's TrainingDiverged) exits 1."""
    from selfmoe.training.arguments import fail
    from selfmoe.training.trainer import TrainingDiverged

    try:
        return train()
    except InputError as e:  # any file the user gave: checkpoint, DeepSpeed JSON, data
        fail(str(e))
    except data_errors as e:
        fail(describe(e))
    except TrainingDiverged as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
