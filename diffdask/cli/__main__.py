"""``python -m diffdask.cli``: the ``diffdask`` command."""

from diffdask.cli import main

main()
