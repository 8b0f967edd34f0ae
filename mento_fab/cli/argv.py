"""Optional positional arguments, which invoke's parser does not have.

A task lists them in an ``optional_positional`` attribute (``ps [NAME]``,
``stop NAME | --all``); before invoke parses the task arguments, the first bare
word after such a task (one that is not the value of an option) becomes
``--name WORD``. Under ``inv`` the flag form (``--name WORD``) works as well.

>>> from invoke import Collection, task
>>> @task
... def ps(c, name=None, json=False, lines=10): ...
>>> ps.optional_positional = ("name",)
>>> optional_positionals(["ps", "--json", "w1", "--lines", "5"], Collection(ps))
['ps', '--json', '--name', 'w1', '--lines', '5']
"""

from __future__ import annotations

from typing import Any

from invoke import Collection

__all__ = ["optional_positionals"]


def optional_positionals(argv: list[str], collection: Collection) -> list[str]:
    """``argv`` (the task part) with optional positionals turned into ``--flag value``."""
    out: list[str] = []
    wanted: list[str] = []
    takes_value: set[str] = set()
    expect_value = False
    for token in argv:
        if expect_value:
            expect_value = False
            out.append(token)
            continue
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            expect_value = "=" not in token and flag in takes_value
            out.append(token)
            continue
        task = _task(collection, token)
        if task is not None and not wanted:
            wanted = list(getattr(task, "optional_positional", ()))
            takes_value = {
                f"--{name}" if len(name) > 1 else f"-{name}"
                for arg in task.get_arguments()
                if arg.takes_value
                for name in arg.names
            }
            out.append(token)
            continue
        if wanted:
            out += [f"--{wanted.pop(0).replace('_', '-')}", token]
            continue
        out.append(token)
    return out


def _task(collection: Collection, token: str) -> Any:
    try:
        return collection[token]
    except (KeyError, ValueError, TypeError):
        return None
