"""`python -m services ...` is the `opd` command."""

from services.cli import app

if __name__ == "__main__":
    app()
