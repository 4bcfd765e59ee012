"""``python -m cimext.cli``: the ``cimext`` command line."""

from cimext.cli import main

raise SystemExit(main())
