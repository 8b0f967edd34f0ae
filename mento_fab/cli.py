"""The ``mento-fab`` command: an invoke Program over the same tasks as ``inv``."""

from __future__ import annotations

from invoke import Config, Program

from mento_fab import __version__
from mento_fab.tasks import namespace
from mento_fab.tasks._common import configure_logging


class MentoConfig(Config):
    """Config files are ``/etc/mento_fab.yaml``, ``~/.mento_fab.yaml``, ``./mento_fab.yaml``."""

    prefix = "mento_fab"
    env_prefix = "MENTO_FAB"


program = Program(
    namespace=namespace(),
    name="mento-fab",
    binary="mento-fab",
    version=__version__,
    config_class=MentoConfig,
)


def main() -> None:
    configure_logging()
    program.run()
