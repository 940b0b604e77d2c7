# SPDX-License-Identifier: Apache-2.0
"""
The ``pyro-vdrop`` program's entry point.

A program, unlike a library, may set process-wide defaults. This one sets ``OMP_WAIT_POLICY=PASSIVE`` when the
user has not set it, before torch (and with it the OpenMP runtime, which reads the variable once, when it is
loaded) is imported. With OpenMP's default policy, idle torch threads spin-wait for work; on a machine where
another program also wants the CPUs (a test suite, a second run) the spinning threads and the descheduled ones
stall each other and a run can take several times as long. With ``PASSIVE`` they sleep. Set
``OMP_WAIT_POLICY=ACTIVE`` in the environment to keep OpenMP's default behaviour.
"""

import os
import sys

#: The OpenMP wait policy the program uses unless the environment sets one.
OMP_WAIT_POLICY = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    """Runs ``pyro-vdrop``: :func:`pyro_vdrop.cli.main` with the program's process-wide defaults."""
    if "torch" not in sys.modules:  # later, the OpenMP runtime has read its environment already
        os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    from pyro_vdrop.cli import main as cli_main

    return cli_main(argv)


__all__ = ["OMP_WAIT_POLICY", "main"]
