"""The ``transgqla`` command line (Typer): parse, call the library, render."""
