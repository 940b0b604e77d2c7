# SPDX-License-Identifier: Apache-2.0
"""``python -m pyro_vdrop`` runs the ``pyro-vdrop`` command."""

import sys

from pyro_vdrop.program import main

sys.exit(main())
