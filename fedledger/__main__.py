"""``python -m fedledger`` runs the ``fedledger`` command."""

from fedledger.cli import main

main()
