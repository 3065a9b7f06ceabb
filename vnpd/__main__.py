"""`python -m vnpd` is the same as the `vnpd` console script."""

from vnpd.cli import main

raise SystemExit(main())
