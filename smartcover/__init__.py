"""The `smartcover` command line and the wiring that runs the parts together."""
