"""`python -m walasync` and the `walasync` console script: the operator's command.

Its libraries (click, rich) come with the `walasync[cli]` extra; without them this says so
in one line instead of a traceback. `import walasync` never imports them.
"""

from __future__ import annotations

import sys

__all__ = ("main",)

NO_CLI = 9  # the exit code when the extra is missing (EXIT["no-cli"] in _cli.py)


def main() -> None:
    """Run the `walasync` command."""
    try:
        import rich  # noqa: F401 - imported where used; checked here, once

        from ._cli import cli
    except ImportError as exc:
        if exc.name not in ("click", "rich"):
            raise
        print(
            f"walasync: the command needs {exc.name}: pip install 'walasync[cli]'",
            file=sys.stderr,
        )
        sys.exit(NO_CLI)
    cli(prog_name="walasync")


if __name__ == "__main__":
    main()
