"""Every error class survives a pickle round trip (multiprocessing in beamline scripts)."""

from __future__ import annotations

import inspect
import pickle
import types
from concurrent.futures import ProcessPoolExecutor

import pytest

import mento_fab.errors as errors

CLASSES = [getattr(errors, name) for name in errors.__all__]
#: Positional arguments for classes whose __init__ is not (message, messages).
ARGS = {
    errors.MetadataError: ("/gpfs/current/beamtime-metadata.json", "corePath: missing"),
    errors.NoOnlineAnalysis: ("11019999", "Slurm accounts"),
    errors.DeployInterrupted: ("deploy interrupted by SIGTERM", None, 15),
    errors.StepFailed: (types.SimpleNamespace(reason="stage failed: no space left"),),
}


def make(cls: type[errors.MentoError]) -> errors.MentoError:
    args = ARGS.get(cls, (f"{cls.__name__} went wrong",))
    error = cls(*args)
    error.messages = {"corePath": ["Missing data."]}
    return error


def test_every_class_is_covered() -> None:
    custom = [c for c in CLASSES if "__init__" in vars(c) and c is not errors.MentoError]
    assert set(custom) <= set(ARGS), custom
    assert all(inspect.isclass(c) and issubclass(c, errors.MentoError) for c in CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_a_pickle_round_trip_keeps_class_message_and_data(cls) -> None:
    error = make(cls)
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls
    assert str(back) == str(error)
    assert back.args == error.args
    assert back.messages == {"corePath": ["Missing data."]}
    assert vars(back) == vars(error)


def _raise_metadata_error() -> None:
    raise make(errors.MetadataError)


def test_an_error_raised_in_a_worker_process_reaches_the_parent() -> None:
    with ProcessPoolExecutor(1) as pool, pytest.raises(errors.MetadataError) as info:
        pool.submit(_raise_metadata_error).result()
    assert info.value.path == "/gpfs/current/beamtime-metadata.json"
    assert str(info.value) == "/gpfs/current/beamtime-metadata.json: corePath: missing"
