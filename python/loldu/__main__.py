"""`python -m loldu ...`: the same as the `loldu` console script."""
from .cli import main

raise SystemExit(main())
