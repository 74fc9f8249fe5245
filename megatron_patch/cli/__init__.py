"""Command-line entry points; each is a console script and a tools/ script."""
