"""`python -m featx` runs the CLI."""
from featx.cli.app import main

main()
