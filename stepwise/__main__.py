"""`python -m stepwise ...` is the `stepwise` command."""

from stepwise.cli import main

main()
