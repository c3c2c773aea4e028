"""EMC: 2D classification with in-plane rotations and bootstrapping; 3D orientation recovery."""

from diffdask.emc.bootstrap import BootstrapResult, bootstrap, bootstrap_membership
from diffdask.emc.detector import EMCDetector
from diffdask.emc.detector3d import Detector3D
from diffdask.emc.emc2d import EMC2D, EMCIteration, EMCResult
from diffdask.emc.emc3d import EMC3D, EMC3DIteration, EMC3DResult
from diffdask.emc.quaternions import fundamental_zone, group_quaternions, quaternion_set

__all__ = [
    "EMC2D",
    "EMC3D",
    "BootstrapResult",
    "Detector3D",
    "EMC3DIteration",
    "EMC3DResult",
    "EMCDetector",
    "EMCIteration",
    "EMCResult",
    "bootstrap",
    "bootstrap_membership",
    "fundamental_zone",
    "group_quaternions",
    "quaternion_set",
]
