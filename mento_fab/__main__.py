"""``python -m mento_fab`` is the ``mento-fab`` command."""

from mento_fab.cli import main

main()
