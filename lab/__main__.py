"""`python -m lab ...`: the same commands as the `controlplane` console script."""

from lab.cli import main

main()
