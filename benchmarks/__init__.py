# SPDX-License-Identifier: Apache-2.0
"""
Benchmark scripts of pyro-vdrop (not tests). ``python -m benchmarks.run`` runs the step-time / memory suite
against the peers and the scaling study; the other modules are stand-alone scripts
(``python benchmarks/step_time.py``, ...). See ``benchmarks/README.md``.
"""
