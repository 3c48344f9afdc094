"""``python -m ocnopt ...``: the ``ocnopt`` command line (``ocnopt/cli.py``)."""

from .cli import app

if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess in the tests
    app(prog_name="ocnopt")
