"""``python -m rigshift_cli``: the ``rigshift`` command."""

from rigshift_cli import main

main()
