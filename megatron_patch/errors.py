"""The errors a user can cause or must act on, and how every command line reports them: one line on stderr,
`PROG: error: MESSAGE`, no traceback.

Every such error derives from MegatronPatchError (tests/unit/test_code_style.py checks it); each entry point
catches it once, with `one_line_errors`, and parses its flags with OneLineErrorParser. The lowest layer: imports
nothing of the package (and no torch), so every layer may raise these.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Iterator, Optional


class MegatronPatchError(Exception):
    """A mistake in the input or the setup the user has to fix (or a failure they must act on): reported as one
    line, never as a traceback."""

    exit_code = 2  # the command line's exit status (2: bad input, as argparse's; 1: the work failed)
    collective = False  # True: every rank raises the same error, only rank 0 prints it


def fail(prog: str, message, exit_code: int = 2) -> None:
    """`PROG: error: MESSAGE` on stderr, then exit."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`PROG: error: MESSAGE`, exit 2) like every other bad input."""

    def error(self, message):
        fail(self.prog, message)


@contextlib.contextmanager
def one_line_errors(prog: str, say: Optional[Callable[[MegatronPatchError], bool]] = None,
                    exit_code: Optional[int] = None) -> Iterator[None]:
    """A MegatronPatchError raised inside becomes `PROG: error: MESSAGE` on stderr and the error's exit code
    (`exit_code`: this one for every error instead). `say(error)`: whether this process prints it (default: yes)."""
    try:
        yield
    except MegatronPatchError as error:
        if say is None or say(error):
            print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code if exit_code is None else exit_code)
