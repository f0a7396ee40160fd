"""``python -m longswap`` runs the command line (``torchrun -m longswap`` too)."""

from longswap.cli import main

raise SystemExit(main())
