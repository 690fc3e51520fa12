"""``python -m flatl2o`` runs the command line."""

from flatl2o.cli import main

raise SystemExit(main())
