# SPDX-License-Identifier: Apache-2.0
"""A ``fit`` callback that stops training at a given step, as a crash or Ctrl-C would."""


class Interrupt(Exception):
    pass


def interrupt_at(stop_step):
    def callback(info):
        if info["step"] == stop_step:
            raise Interrupt

    return callback
