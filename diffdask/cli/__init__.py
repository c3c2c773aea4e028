"""The ``diffdask`` command: parses arguments, connects to a cluster, calls the library.

One module per command group, each registering its commands on the `main` group of
`diffdask.cli._common` (which also holds the shared options and the one-line error handling):
`store` (ingest, info), `reduce`, `simulate`, `emc` (emc2d, bootstrap), `commonlines`,
`latent` (latent, explore), `ml` (train, predict), `refine`, `roi`, `run`. Each command imports
the library inside its body, so ``diffdask --help`` starts fast.
"""

from diffdask.cli import commonlines, emc, latent, ml, reduce, refine, roi, run, simulate, store  # noqa: F401 (registers)
from diffdask.cli._common import main

__all__ = ["main"]
