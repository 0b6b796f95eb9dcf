"""selfmoe.training.errors: how the entry scripts (pretrain_gpt.py, pretrain_vit.py) end on errors."""

import pytest

from selfmoe.training.errors import InputError, one_line, reraise_as, run_or_exit
from selfmoe.training.trainer import TrainingDiverged


class DataError(Exception):
    pass


def _raise(e):
    def train():
        raise e
    return train


@pytest.mark.parametrize("error, describe, code, line", [
    (InputError("cannot load checkpoint", "/ck/iter_0000003", "EOFError"), str, 2,
     "error: cannot load checkpoint: /ck/iter_0000003: EOFError"),
    # a DataLoader worker's error arrives with the worker's traceback; `describe` keeps its last line
    (DataError("Traceback (most recent call last):\n  ...\nDataError: a.png: not an image file"),
     lambda e: str(e).splitlines()[-1].split("DataError: ")[-1], 2, "error: a.png: not an image file"),
    (TrainingDiverged("loss was NaN for 5 iterations; last good checkpoint /ck/iter_0000002"), str, 1,
     "error: loss was NaN for 5 iterations; last good checkpoint /ck/iter_0000002"),
])
def test_user_errors_end_in_one_line_with_their_exit_code(error, describe, code, line, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as e:
        run_or_exit(_raise(error), data_errors=(DataError,), describe=describe)
    assert e.value.code == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_other_ranks_stay_silent_and_other_errors_pass_through(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        run_or_exit(_raise(InputError("x")))
    assert capsys.readouterr().err == ""
    with pytest.raises(KeyError):  # a bug is not a user error: its traceback stays
        run_or_exit(_raise(KeyError("k")), data_errors=(DataError,))
    assert run_or_exit(lambda: 7) == 7


def test_reraise_as_catches_base_exceptions_in_one_line():
    class CheckpointException(BaseException):  # torch.distributed.checkpoint's derives from BaseException
        failures = {1: (EOFError(), None)}

    with pytest.raises(InputError) as e:
        with reraise_as("cannot load checkpoint", "/ck"):
            raise CheckpointException("many\nlines")
    assert str(e.value) == "cannot load checkpoint: /ck: EOFError (rank 1)"
    assert one_line("a\n  b") == "a b" and len(one_line("x" * 500)) == 400
