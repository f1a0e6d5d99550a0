"""``python -m services`` is the ``trialwatch`` command."""

from services.cli import main

main()
