"""`python -m smartcover` runs the CLI."""

from smartcover.cli import main

main()
