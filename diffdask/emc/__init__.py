"""2D EMC classification (expand–maximise–compress) with in-plane rotations and bootstrapping."""

from diffdask.emc.detector import EMCDetector
from diffdask.emc.emc2d import EMC2D, EMCIteration, EMCResult

__all__ = ["EMC2D", "EMCDetector", "EMCIteration", "EMCResult"]
