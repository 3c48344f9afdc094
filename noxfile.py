"""Developer sessions: ``nox -s tests``, ``nox -s slow``, ``nox -s lint``, ``nox -s typecheck``.

``nox -l`` lists them; ``nox -R -s NAME`` reuses an existing virtualenv (skips the install).
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
LINT_PATHS = ["ocnopt", "backends", "tests", "benchmarks", "noxfile.py"]

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = False


@nox.session
def tests(session: nox.Session) -> None:
    """The fast suite, as the README runs it: ``pytest -n 2`` (slow tests deselected)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "2", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Only the tests marked ``slow`` (the default ``-m 'not slow'`` is overridden)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "2", "-m", "slow", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """``ruff check`` on the package, the backends, the tests, the benchmarks and this file."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", *(session.posargs or LINT_PATHS))


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy on the INSTALLED package ``ocnopt`` (and on the benchmark scripts, this file).

    ``backends/`` is installed as ``ocnopt.backends`` through a package-dir mapping that type
    checkers cannot follow in an editable install (nor in the source tree, where ``ocnopt/``
    has no ``backends``). So the package is installed non-editable, copied out of
    site-packages into a scratch directory (mypy refuses to check code that lives in
    site-packages without a ``py.typed`` marker) and checked from there, with this
    repository's ``[tool.mypy]`` configuration. The benchmark scripts and this file are
    checked in the same run, importing that copy.
    """
    session.install(".", "mypy>=1.10")
    purelib = session.run(
        "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", silent=True
    )
    assert isinstance(purelib, str)
    installed = Path(purelib.strip().splitlines()[-1]) / "ocnopt"
    scratch = Path(session.create_tmp()) / "typecheck"
    session.run("rm", "-rf", str(scratch), external=True, silent=True)
    scratch.mkdir(parents=True)
    session.run("cp", "-r", str(installed), str(scratch / "ocnopt"), external=True)
    config = str(ROOT / "pyproject.toml")
    extra = [str(p) for p in sorted((ROOT / "benchmarks").glob("*.py"))] + [__file__]
    with session.chdir(scratch):
        session.run("mypy", "--config-file", config, "ocnopt", *extra)
