"""``inv`` in a checkout: every mento_fab task, plus ``lab.*`` for the local test cluster."""

from mento_fab.cli import namespace
from mento_fab.cli.options import configure_logging

configure_logging()
ns = namespace()

try:  # the lab is a development tool, not part of the installed package
    from lab.tasks import ns as lab_tasks
except ImportError:  # pragma: no cover - lab/ missing in an sdist
    lab_tasks = None
if lab_tasks is not None:
    ns.add_collection(lab_tasks)
