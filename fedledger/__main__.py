"""``python -m fedledger`` runs the ``fedledger`` command."""

from .cli import app

app(prog_name="fedledger")
