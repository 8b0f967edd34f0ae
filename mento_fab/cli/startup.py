"""Start-up cost of the command line: import invoke without ``unittest.mock``.

``invoke.context`` imports ``unittest.mock`` at import time for ``MockContext``
alone, and ``unittest.mock`` imports ``asyncio``: together about 40 % of invoke's
import time, which every ``mento-fab`` call paid (paramiko imports invoke too).
:func:`import_invoke` imports invoke with a stand-in ``Mock`` that loads the real
one the first time a MockContext is made, and removes the stand-in at once, so a
later ``import unittest.mock`` gets the real module::

    import_invoke()
    import invoke, fabric   # no asyncio, no unittest
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["import_invoke"]


class _Mock:
    """``unittest.mock.Mock``, imported when first called (only MockContext calls it)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from unittest import mock

        return mock.Mock(*args, **kwargs)


def import_invoke() -> None:
    """Import invoke (once) without importing ``unittest.mock`` and ``asyncio``."""
    if "invoke" in sys.modules or "unittest.mock" in sys.modules:
        return
    stand_in = types.ModuleType("unittest.mock", "stand-in while invoke is imported")
    stand_in.Mock = _Mock  # type: ignore[attr-defined]
    sys.modules["unittest.mock"] = stand_in
    try:
        import invoke  # noqa: F401
    finally:
        if sys.modules.get("unittest.mock") is stand_in:
            del sys.modules["unittest.mock"]
