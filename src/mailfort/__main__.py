"""``python -m mailfort``: the same as the ``mailfort`` command."""

from mailfort.cli import main

raise SystemExit(main())
