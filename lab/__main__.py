"""`python -m lab ...`: the same commands as the `shoplab` console script."""

from lab.cli import main

main()
