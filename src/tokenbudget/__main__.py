"""``python -m tokenbudget`` (and ``torchrun -m tokenbudget``): the command-line interface."""

from .cli import main

raise SystemExit(main())
