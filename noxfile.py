"""Sessions: tests (the CI gate), verify, typecheck, lint, bench, demo.

Every session installs torch 2.13.0 (the CPU wheel on this machine kind's disk) through
`constraints.txt`; never an unpinned torch, which would pull a multi-GB CUDA build.
"""

import nox

nox.options.default_venv_backend = "venv"  # uv ignores the on-disk wheel
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

CONSTRAINTS = ("-c", "constraints.txt")


def _install(session: nox.Session, extras: str) -> None:
    session.install(*CONSTRAINTS, "torch==2.13.0")
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Unit tests, the fast verification profile, mypy --strict and ruff: the CI gate."""
    _install(session, "test,experiments")
    session.run("ruff", "check", "snopt", "tests", "verification", "benchmarks", "examples", "scripts", "noxfile.py")
    session.run("mypy", "--strict", "snopt", "benchmarks", "verification")
    session.run("pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *session.posargs,
                env={"SNOPT_HYPOTHESIS_PROFILE": "fast", "OMP_NUM_THREADS": "2"})


@nox.session(python="3.11")
def verify(session: nox.Session) -> None:
    """The whole verification tree with the thorough hypothesis profile (slow checks included)."""
    _install(session, "test,experiments")
    session.run("pytest", "-q", "verification", *session.posargs, env={"SNOPT_HYPOTHESIS_PROFILE": "thorough"})


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, the benchmark scripts and the verification tree."""
    _install(session, "test,experiments")
    session.run("mypy", "--strict", "snopt", "benchmarks", "verification")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "snopt", "tests", "verification", "benchmarks", "examples", "scripts", "noxfile.py")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks; tables are written to benchmarks/results/."""
    _install(session, "test,bench,experiments")
    session.run("pytest", "-q", "benchmarks", "--benchmark-only", "-p", "no:cacheprovider", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """The main job: a short SNOpt vs Adam vs SGD comparison on real offline data."""
    _install(session, "experiments")
    session.run("python", "-m", "benchmarks.apps", "demo", *session.posargs)
