"""Detector geometry refined per frame from diffuse background rings.

A network gives a beam centre and a detector tilt to a pixel and a degree; the rings of
amorphous scatterers (water, a polymer jet or tape, the air path) carry the geometry to a
fraction of that. `refine_geometry` fits, frame by frame, the model

    μ(pixel) = P ΔΩ / max(ΔΩ) · Σₖ aₖ exp(−(q − qₖ)² / 2σₖ²) + c

to the photon counts, where q, the polarisation factor P and the solid angle ΔΩ of every
pixel follow from the beam centre, the pitch and yaw of the detector and its distance (the
five refined parameters, see `Geometry.tilted_maps`), and the ring amplitudes aₖ and the flat
level c are solved linearly at each step (variable projection). The ring positions qₖ and
widths σₖ are given, as a calibrant's d-spacings are: they fix the distance, which a ring of
unknown position cannot tell from a tilt.

The fit minimises Pearson's χ² with weights 1/μ taken from the previous round (iteratively
reweighted, so the weights follow the Poisson variance and not the noisy counts); pixels of
Bragg spots, zingers and streaks, more than ``reject_sigma`` standard deviations above the
model (or whose 3×3 neighbourhood is, which catches the faint tails of bright spots), are left
out with their neighbours before the next round; the first round fits a low local percentile
of the counts, which the spots barely touch, so that the first model already sits on the rings.
Standard errors come from the curvature of χ² at the minimum, inflated by the reduced χ² of
the pixels and of 4×4-pixel tiles when either exceeds 1 (faint spots left in make residuals
that agree over a few pixels), so each frame says how well its rings pin its geometry; on
simulated frames the misses scatter as these errors say. A frame whose rings are too weak (no
ring amplitude ``min_ring_snr`` times its error) keeps its starting values and is flagged
``refined = False``: a flat background carries no ring.

The fit converges from anywhere within about ±10 pixels and ±3° of the truth (tested from
the nominal geometry); the per-frame fit is NumPy/SciPy work on the CPU, about ten frames per
second per core for a 128×128 detector (a frame without rings is declined in milliseconds).

Layout: `diffdask.refine.model` holds the ring model of one frame at a fixed geometry and the
spot rejection, `diffdask.refine.kernels` the per-frame fit and the block kernels (NumPy/SciPy
on blocks), `diffdask.refine.graph` the Dask graph builders `refine_geometry` and
`refine_run_geometry`.
"""

from diffdask.refine.graph import refine_geometry, refine_run_geometry
from diffdask.refine.kernels import GEOMETRY_FIELDS, refine_frame, refine_kernel, run_normal_equations_kernel

__all__ = [
    "GEOMETRY_FIELDS",
    "refine_frame",
    "refine_geometry",
    "refine_kernel",
    "refine_run_geometry",
    "run_normal_equations_kernel",
]
