# SPDX-License-Identifier: Apache-2.0
"""Run provenance: the versions and the machine recorded with every training run and benchmark record."""

import os
import platform
import sys

import numpy as np
import pyro
import torch


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: "torch.device | str | None" = None) -> dict:
    """
    Versions and machine, recorded with every training run (``config.json``) and every benchmark record: one
    schema for both.

    :param device: The device the run computes on; with a CUDA device its name and the CUDA version are added.
    """
    import pyro_vdrop

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "pyro_vdrop": pyro_vdrop.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if device is not None:
        info["device"] = str(device)
        if torch.device(device).type == "cuda":
            info["cuda_device_name"] = torch.cuda.get_device_name(device)
            info["cuda_version"] = torch.version.cuda
    return info


__all__ = ["cpu_model", "environment"]
