"""Print what this machine runs cascade-rag with, and any unmet requirement.

Usage: python scripts/check_install.py  (exit status 1 if a requirement is missing)
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import sys

from packaging.requirements import Requirement


def main() -> int:
    print(f"python {platform.python_version()} on {platform.machine()}")
    import torch

    extras = {"", "gpu"} if torch.cuda.is_available() else {""}
    missing = []
    for text in md.requires("cascade-rag") or []:
        req = Requirement(text)
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue  # an extra this machine does not need
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            missing.append(f"{req} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            missing.append(f"{req} (have {have})")

    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU available: "
        f"{torch.cuda.is_available()}"
    )
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    try:
        print(f"flashinfer-python {md.version('flashinfer-python')}")
    except md.PackageNotFoundError:
        print("flashinfer-python: not installed (GPU attention needs it)")
    for line in missing:
        print(f"unmet: {line}")
    print("all requirements met" if not missing else f"{len(missing)} unmet requirement(s)")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
