"""featx command line: a thin Typer layer over the library (the only package that imports typer/rich)."""
