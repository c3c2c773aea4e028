"""Simulators that write ground-truth frame stacks: SPI, ptychography and Bragg images.

Each ``simulate_*`` function returns a lazy frame stack whose chunks are generated on the
workers from (seed, frame index): the bytes do not depend on the chunking or the number of
workers, and writing any number of frames holds only a few chunks in memory.
"""

from diffdask.simulate.atoms import CROMER_MANN, atomic_form_factor, read_pdb
from diffdask.simulate.bragg import (
    bragg_kernel,
    bragg_reflections,
    cell_matrix,
    simulate_bragg,
)
from diffdask.simulate.common import (
    ELECTRON_RADIUS_M,
    detector_mask,
    quaternion_to_matrix,
)
from diffdask.simulate.formfactor import (
    FormFactorVolume,
    form_factor_volume,
    required_grid_size,
    trilinear,
)
from diffdask.simulate.particles import (
    SHAPES,
    Particle,
    melting_ensemble,
    sphere_amplitude,
)
from diffdask.simulate.ptycho import (
    PtychoSample,
    make_probe,
    make_sample,
    object_ground_truth,
    ptycho_kernel,
    ptycho_sample,
    scan_positions,
    simulate_ptycho,
)
from diffdask.simulate.spi import simulate_spi, spi_kernel

__all__ = [
    "CROMER_MANN",
    "ELECTRON_RADIUS_M",
    "SHAPES",
    "FormFactorVolume",
    "Particle",
    "PtychoSample",
    "atomic_form_factor",
    "bragg_kernel",
    "bragg_reflections",
    "cell_matrix",
    "detector_mask",
    "form_factor_volume",
    "make_probe",
    "make_sample",
    "melting_ensemble",
    "object_ground_truth",
    "ptycho_kernel",
    "ptycho_sample",
    "quaternion_to_matrix",
    "read_pdb",
    "required_grid_size",
    "scan_positions",
    "simulate_bragg",
    "simulate_ptycho",
    "simulate_spi",
    "sphere_amplitude",
    "spi_kernel",
    "trilinear",
]
