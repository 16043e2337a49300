"""``python -m proxy`` is the same as the ``fhircrypt`` command."""

from proxy.cli import main

main()
