"""``python -m fedledger`` runs the ``fedledger`` command."""

from fedledger.cli import app

app(prog_name="fedledger")
