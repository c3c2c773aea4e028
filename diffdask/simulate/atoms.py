"""Atoms for particle models: element form factors and a minimal PDB reader.

Form factors use the Cromer–Mann (Waasmaier–Kirfel-style four-Gaussian) parametrisation of
International Tables for Crystallography Vol. C, Table 6.1.1.4:

    f(sinθ/λ) = Σᵢ aᵢ exp(−bᵢ (sinθ/λ)²) + c,   sinθ/λ in Å⁻¹,

valid to sinθ/λ ≈ 2 Å⁻¹, far beyond single-particle resolutions. Anomalous terms f′, f″ are
neglected (they matter only near absorption edges).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffdask.backend import array_namespace
from diffdask.errors import ParameterError, StoreFormatError, StoreNotFoundError

#: Cromer–Mann coefficients (a1, b1, a2, b2, a3, b3, a4, b4, c); b in Å².
CROMER_MANN: dict[str, tuple[float, ...]] = {
    "H": (0.493002, 10.5109, 0.322912, 26.1257, 0.140191, 3.14236, 0.040810, 57.7997, 0.003038),
    "C": (2.31000, 20.8439, 1.02000, 10.2075, 1.58860, 0.568700, 0.865000, 51.6512, 0.215600),
    "N": (12.2126, 0.005700, 3.13220, 9.89330, 2.01250, 28.9975, 1.16630, 0.582600, -11.529),
    "O": (3.04850, 13.2771, 2.28680, 5.70110, 1.54630, 0.323900, 0.867000, 32.9089, 0.250800),
    "P": (6.43450, 1.90670, 4.17910, 27.1570, 1.78000, 0.526000, 1.49080, 68.1645, 1.11490),
    "S": (6.90530, 1.46790, 5.20340, 22.2151, 1.43790, 0.253600, 1.58630, 56.1720, 0.866900),
}


def atomic_form_factor(element: str, s_inv_nm: Any) -> Any:
    """X-ray form factor of a neutral atom, electrons.

    Parameters
    ----------
    element : str
        Element symbol, one of `CROMER_MANN` (H, C, N, O, P, S).
    s_inv_nm : array
        Length |s| = 2 sinθ/λ of the scattering vector, nm⁻¹ (NumPy or CuPy).

    Returns
    -------
    array
        f(|s|) in electrons, same shape and library as ``s_inv_nm``.
    """
    key = element.strip().capitalize()
    if key not in CROMER_MANN:
        raise ParameterError(
            f"no form factor for element {element!r}; known elements: {', '.join(CROMER_MANN)}. "
            "Remove or replace those atoms (e.g. ions, metals) in the PDB file."
        )
    xp = array_namespace(s_inv_nm)
    a1, b1, a2, b2, a3, b3, a4, b4, c = CROMER_MANN[key]
    # |s| in nm⁻¹ is 2 sinθ/λ; the table wants (sinθ/λ)² in Å⁻²: (|s| / 2 / 10)².
    x2 = (s_inv_nm / 20.0) ** 2
    return a1 * xp.exp(-b1 * x2) + a2 * xp.exp(-b2 * x2) + a3 * xp.exp(-b3 * x2) + a4 * xp.exp(-b4 * x2) + c


def read_pdb(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Atoms of a PDB file (ATOM and HETATM records of the first model).

    Parameters
    ----------
    path : str or Path
        PDB file.

    Returns
    -------
    elements : list of str
        Element symbols (columns 77–78, or the atom name when those are blank).
    positions_nm : ndarray, shape (n_atoms, 3)
        Coordinates (x, y, z), nm.
    occupancy : ndarray, shape (n_atoms,)
        Occupancies (1 where the column is blank).

    Raises
    ------
    StoreNotFoundError
        If the file does not exist.
    StoreFormatError
        If it holds no atom records or a record cannot be read.
    ParameterError
        If an element has no tabulated form factor.
    """
    p = Path(path)
    if not p.is_file():
        raise StoreNotFoundError(f"PDB file {str(p)!r} does not exist; give the path of a .pdb file.")
    elements: list[str] = []
    coords: list[tuple[float, float, float]] = []
    occupancy: list[float] = []
    for lineno, line in enumerate(p.read_text(errors="replace").splitlines(), start=1):
        record = line[:6].strip()
        if record == "ENDMDL":
            break
        if record not in ("ATOM", "HETATM"):
            continue
        try:
            xyz = (float(line[30:38]), float(line[38:46]), float(line[46:54]))
        except ValueError:
            raise StoreFormatError(
                f"{p}:{lineno}: cannot read coordinates from columns 31–54 of {line!r}."
            ) from None
        element = line[76:78].strip() if len(line) >= 78 else ""
        if not element:
            # Without the element column, PDB convention puts a one-letter element in column 14.
            element = line[12:16].strip().lstrip("0123456789")[:1]
        occ_text = line[54:60].strip()
        elements.append(element.capitalize())
        coords.append(xyz)
        occupancy.append(float(occ_text) if occ_text else 1.0)
    if not coords:
        raise StoreFormatError(f"PDB file {str(p)!r} holds no ATOM or HETATM records.")
    unknown = sorted(set(elements) - set(CROMER_MANN))
    if unknown:
        raise ParameterError(
            f"PDB file {str(p)!r} has atoms of elements {unknown} with no tabulated form factor; "
            f"known elements: {', '.join(CROMER_MANN)}. Remove those atoms or replace them."
        )
    return elements, np.asarray(coords, dtype=float) / 10.0, np.asarray(occupancy, dtype=float)
