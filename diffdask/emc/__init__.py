"""2D EMC classification (expand–maximise–compress) with in-plane rotations and bootstrapping."""

from diffdask.emc.bootstrap import BootstrapResult, bootstrap, bootstrap_membership
from diffdask.emc.detector import EMCDetector
from diffdask.emc.emc2d import EMC2D, EMCIteration, EMCResult

__all__ = [
    "EMC2D",
    "BootstrapResult",
    "EMCDetector",
    "EMCIteration",
    "EMCResult",
    "bootstrap",
    "bootstrap_membership",
]
