"""`python -m opd ...` is the `opd` command."""

from opd.cli import app

if __name__ == "__main__":
    app()
