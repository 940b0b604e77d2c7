# SPDX-License-Identifier: Apache-2.0
"""
The error of the training loop and the command line: a problem the user can fix, with the message saying how.
"""


class RunError(Exception):
    """A problem with a run directory, its checkpoint, its data or the options given for it; the message says what
    to do. The command line prints it and exits with status 2."""


__all__ = [
    "RunError",
]
