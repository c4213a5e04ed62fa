"""`python -m slimlm` runs the CLI."""

from slimlm.cli import app

app(prog_name="slimlm")
