"""Command line entry point: ``python -m snopt.experiments``."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Run an experiment (not yet: the applications land with their issue)."""
    args = sys.argv[1:] if argv is None else argv
    print(f"snopt.experiments {' '.join(args)}: not yet — the applications land with their issue.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
