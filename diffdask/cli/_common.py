"""What every command shares: the ``main`` group, consoles, one-line errors, cluster options.

Command modules register on `main`; nothing here imports them.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console

from diffdask.errors import DiffdaskError

console = Console()
#: Messages that must not mix into machine-readable output on stdout.
err_console = Console(stderr=True)
#: Seconds the command line waits for a remote scheduler.
CONNECT_TIMEOUT_S = 5.0


def fail_clearly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Show diffdask errors as one clear line and exit status 2, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            return func(*args, **kwargs)
        except DiffdaskError as exc:
            if debug:
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # a library's own error: one line here, the traceback with --debug
            if debug:
                raise
            console.print(
                f"[bold red]error:[/] {type(exc).__name__}: {exc} (run `diffdask --debug ...` for the traceback)",
                highlight=False,
            )
            sys.exit(1)

    return wrapper


scheduler_option = click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="Dask scheduler address or scheduler-file path; default: $DIFFDASK_SCHEDULER, else a local cluster.",
)
workers_option = click.option(
    "--workers", type=int, default=None, help="Worker processes of the local cluster (default: one per core)."
)
#: ``--seed``: every random choice of a command derives from it (same seed, same bytes).
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice.")
#: ``--overwrite`` of a command that writes a result group beside the frames.
overwrite_result_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing result group of that name (one diffdask wrote)."
)
#: ``--overwrite`` of a command that writes a whole store.
overwrite_store_option = click.option(
    "--overwrite", is_flag=True, help="Replace a store that holds other data (only one diffdask wrote)."
)


@contextmanager
def cluster_client(scheduler: str | None, workers: int | None, quiet: bool = False) -> Any:
    from diffdask.cluster import connect

    # A few seconds is plenty for a reachable scheduler; a wrong address must fail fast, not hang.
    if scheduler and (scheduler.endswith(".json")):
        client = connect(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT_S)
    else:
        client = connect(address=scheduler, n_workers=workers, timeout=CONNECT_TIMEOUT_S)
    try:
        (err_console if quiet else console).print(f"Dask dashboard: {client.dashboard_link}", highlight=False)
        yield client
    finally:
        client.close()


def run_with_progress(client: Any, job: Any) -> Any:
    """Compute a lazy job on ``client`` with a progress bar; return its result."""
    from distributed import progress

    future = client.compute(job)
    # distributed.progress draws in a terminal or notebook; dask.diagnostics.ProgressBar
    # would print nothing under a distributed client.
    progress(future)
    print(file=sys.stderr)
    return future.result()


@click.group()
@click.version_option(package_name="diffdask")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""
    # Advice meant for library authors (scatter large arguments); nothing a CLI user can act on.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
