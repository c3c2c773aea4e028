"""Declared batch pipelines over many inputs, resumable and tolerant of failed inputs.

A pipeline file (YAML) names the inputs, where each input's store goes, and the steps::

    inputs: archive/run_*.cxi          # a glob, or a list of globs/paths (HDF5 files or Zarr stores)
    output: processed/{stem}.zarr      # store of each input; {stem} = input file name without suffix
    state: processed/.pipeline         # done flags (default: <pipeline file dir>/.diffdask-pipeline)
    steps:
      - ingest: {dataset: entry_1/data_1/data, batch_frames: 500}
      - emc2d: {classes: 4, rotations: 12, iterations: 5}
      - latent: {components: 5, crop: 64, single_fraction: 0.95}

Each (input, step) pair is marked done — a small JSON file written with an atomic rename — only
after the step has finished writing; steps themselves write resumable stores, so a run killed
at any moment (even SIGKILL) continues where it stopped when started again, and nothing is
marked done that was not fully written. A flag records a key of everything that determines the
step's result (the input's path, size and modification time, the step's options, the output
store and the previous step's key): a step is skipped only when its key is unchanged and its
output store still exists complete, and once a step runs again every later step does too —
so a changed option or a deleted output is recomputed, never silently kept. An input whose step fails is reported and skipped;
the others go on.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffdask.errors import DiffdaskError, ParameterError, StoreNotFoundError

StepFunction = Callable[[str, str, Mapping[str, Any]], str]
_STEPS: dict[str, tuple[StepFunction, frozenset[str]]] = {}


def register_step(name: str, options: set[str]) -> Callable[[StepFunction], StepFunction]:
    """Register ``func(input_path, store_path, options) -> summary`` as pipeline step ``name``.

    ``options`` lists the keys a pipeline file may give the step; others are refused when the
    file is loaded, before any work starts.
    """

    def wrap(func: StepFunction) -> StepFunction:
        _STEPS[name] = (func, frozenset(options))
        return func

    return wrap


def available_steps() -> list[str]:
    """Names of the steps a pipeline file can use."""
    return sorted(_STEPS)


@register_step("ingest", {"dataset", "mask", "batch_frames", "per_frame"})
def _ingest(source: str, store: str, options: Mapping[str, Any]) -> str:
    from diffdask.io import ingest_hdf5, store_info
    from diffdask.io.location import Location

    if not Location.of(source).is_hdf5_file():
        raise ParameterError(f"ingest takes HDF5/CXI inputs; {source!r} is not an HDF5 file.")
    ingest_hdf5(
        source,
        store,
        options.get("dataset", "entry_1/data_1/data"),
        mask=options.get("mask"),
        per_frame=options.get("per_frame"),
        batch_frames=options.get("batch_frames"),
    )
    info = store_info(store)
    return f"{info['n_frames']} frames, compression {info['compression_ratio']:.1f}×"


@register_step("reduce", {"what", "threshold", "min_lit", "bin_width_px", "group"})
def _reduce(source: str, store: str, options: Mapping[str, Any]) -> str:
    from diffdask.io import open_frames, save_results
    from diffdask.reduce import summarize

    parts = tuple(str(options.get("what", "com,radial,hits")).split(","))
    hits = "hits" in parts
    threshold = options.get("threshold", 0.5)
    min_lit = options.get("min_lit", 20)
    summary = summarize(
        open_frames(store),
        threshold=threshold if hits else None,
        min_lit=min_lit if hits else None,
        bin_width_px=float(options.get("bin_width_px", 1.0)),
        include=parts,
    )
    saved = save_results(summary, store, str(options.get("group", "summary")), overwrite=True)
    if "is_hit" in saved:
        return f"hit rate {float(saved['is_hit'].mean()):.1%}"
    return f"{saved.sizes['frame']} frames reduced"


@register_step("predict", {"model", "mirror", "group"})
def _predict(source: str, store: str, options: Mapping[str, Any]) -> str:
    from diffdask.io import open_frames, save_results
    from diffdask.ml import predict
    from diffdask.ml.train import ensemble_paths

    if "model" not in options:
        raise ParameterError("step predict needs 'model' (a .pt file or an ensemble directory).")
    model = str(options["model"])
    paths = ensemble_paths(model) if Path(model).is_dir() else [model]
    out = predict(open_frames(store), paths, mirror=bool(options.get("mirror", False)))
    saved = save_results(out, store, str(options.get("group", "predict")), overwrite=True)
    name = "probabilities" if "probabilities" in saved else "predictions"
    return f"{name} for {saved.sizes['frame']} frames from {len(paths)} model(s)"


@register_step("emc2d", {"classes", "rotations", "iterations", "seed", "friedel", "beta", "need_scaling"})
def _emc2d(source: str, store: str, options: Mapping[str, Any]) -> str:
    from diffdask.emc import EMC2D
    from diffdask.io import open_frames, save_results

    for key in ("classes", "rotations"):
        if key not in options:
            raise ParameterError(f"step emc2d needs '{key}'.")
    emc = EMC2D(
        int(options["classes"]),
        int(options["rotations"]),
        friedel=bool(options.get("friedel", False)),
        need_scaling=bool(options.get("need_scaling", True)),
        beta=options.get("beta"),
    )
    result = emc.run(open_frames(store), int(options.get("iterations", 10)), seed=int(options.get("seed", 0)))
    final = result.final
    save_results(final.to_dataset(0), store, "emc2d/final", overwrite=True)
    return f"log-likelihood {final.log_likelihood[0]:.6e} after {final.iteration} iterations"


@register_step(
    "latent",
    {"components", "contamination", "single_fraction", "method", "crop", "downsample", "factor", "intensity",
     "latent_only", "seed"},
)
def _latent(source: str, store: str, options: Mapping[str, Any]) -> str:
    from diffdask.io import open_frames, save_results
    from diffdask.latent import explained_variance_summary, sort_single_hits

    model, result = sort_single_hits(
        open_frames(store),
        int(options.get("components", 3)),
        options.get("contamination"),
        use_residual=not bool(options.get("latent_only", False)),
        expected_single_fraction=options.get("single_fraction"),
        seed=int(options.get("seed", 0)),
        method=str(options.get("method", "incremental")),
        crop=options.get("crop"),
        downsample=str(options.get("downsample", "none")),
        factor=int(options.get("factor", 1)),
        intensity=str(options.get("intensity", "none")),
    )
    saved = save_results(result, store, "latent", overwrite=True)
    n_single = int(saved["single_hit"].values.sum())
    return f"{explained_variance_summary(model)}; {n_single} of {saved.sizes['frame']} frames flagged single hits"


@register_step("roi", {"border", "filter_size", "n_init", "seed"})
def _roi(source: str, store: str, options: Mapping[str, Any]) -> str:
    from diffdask.io import open_frames, save_results
    from diffdask.roi import find_roi, grow_roi

    roi = find_roi(open_frames(store), filter_size=int(options.get("filter_size", 3)),
                   n_init=int(options.get("n_init", 10)), seed=int(options.get("seed", 0)))
    border = int(options.get("border", 0))
    if border:
        roi = grow_roi(roi, border)
    saved = save_results(roi, store, "roi", overwrite=True)
    return f"{int(saved['in_roi'].values.sum())} of {saved.sizes['frame']} positions in the region of interest"


@dataclass
class Pipeline:
    """A loaded pipeline: inputs resolved, output template, state directory and steps."""

    inputs: list[str]
    output: str
    state: Path
    steps: list[tuple[str, dict[str, Any]]]
    source: str = ""

    def store_for(self, source: str) -> str:
        stem = Path(source.rstrip("/")).name
        for suffix in (".zarr", ".cxi", ".h5", ".hdf5", ".nxs"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        return self.output.format(stem=stem, name=Path(source.rstrip("/")).name)

    def _flag(self, source: str, step_index: int, step: str) -> Path:
        key = Path(source.rstrip("/")).name
        return self.state / key / f"{step_index:02d}-{step}.json"

    def step_key(self, source: str, step_index: int, previous: str) -> str:
        """What determines a step's result: the input's identity, the step and its options, the
        output location and the previous step's key (so a change reruns every later step)."""
        name, options = self.steps[step_index]
        record = {"input": _identity(source), "step": name, "index": step_index, "options": options,
                  "store": self.store_for(source), "previous": previous}  # fmt: skip
        return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()

    def is_done(self, source: str, step_index: int, step: str, key: str | None = None) -> bool:
        """A step is done if its flag records this ``key`` and its output store is still complete."""
        flag = self._flag(source, step_index, step)
        if not flag.exists():
            return False
        try:
            record = json.loads(flag.read_text())
        except (OSError, ValueError):
            return False
        if key is not None and record.get("key") != key:
            return False
        return _complete(self.store_for(source))

    def mark_done(self, source: str, step_index: int, step: str, record: Mapping[str, Any]) -> None:
        flag = self._flag(source, step_index, step)
        flag.parent.mkdir(parents=True, exist_ok=True)
        tmp = flag.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, flag)  # atomic: a flag is either absent or complete


def _identity(source: str) -> dict[str, Any]:
    """Path, size and modification time of an input (a file, or a store's root metadata)."""
    if "://" in source:
        return {"url": source}
    path = Path(source).resolve()
    target = path / "zarr.json" if path.is_dir() else path
    try:
        st = target.stat()
    except OSError:
        return {"path": str(path)}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _complete(store: str) -> bool:
    from diffdask.io import store_info

    try:
        return bool(store_info(store)["complete"])
    except DiffdaskError:
        return False


def load_pipeline(path: str) -> Pipeline:
    """Read and check a pipeline file.

    Raises
    ------
    StoreNotFoundError
        The file is missing, or an input path/glob matches nothing.
    ParameterError
        Unknown keys or steps, options a step does not take, or a malformed file.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise StoreNotFoundError(f"pipeline file {path!r} does not exist.")
    try:
        spec = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ParameterError(f"{path!r} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise ParameterError(f"{path!r} must hold a mapping with 'inputs', 'output' and 'steps'.")
    unknown = set(spec) - {"inputs", "output", "state", "steps"}
    if unknown:
        raise ParameterError(f"{path!r}: unknown keys {sorted(unknown)}; use inputs, output, state, steps.")
    for key in ("inputs", "output", "steps"):
        if key not in spec:
            raise ParameterError(f"{path!r} needs '{key}'.")
    base = file.parent
    patterns = spec["inputs"] if isinstance(spec["inputs"], list) else [spec["inputs"]]
    inputs: list[str] = []
    for pattern in patterns:
        full = str(pattern) if os.path.isabs(str(pattern)) or "://" in str(pattern) else str(base / str(pattern))
        matches = sorted(glob.glob(full)) if any(c in full for c in "*?[") else ([full] if os.path.exists(full) else [])
        if not matches:
            raise StoreNotFoundError(f"pipeline input {pattern!r} matches no file or store (looked in {base}).")
        inputs.extend(matches)
    steps = []
    if not isinstance(spec["steps"], list) or not spec["steps"]:
        raise ParameterError(f"{path!r}: 'steps' must be a non-empty list.")
    for entry in spec["steps"]:
        name, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()), (None, None))
        if not isinstance(entry, (str, dict)) or (isinstance(entry, dict) and len(entry) != 1):
            raise ParameterError(f"{path!r}: each step is a name or a one-key mapping name: {{options}}, got {entry!r}.")
        if name not in _STEPS:
            raise ParameterError(f"{path!r}: unknown step {name!r}; available steps: {', '.join(available_steps())}.")
        options = dict(options or {})
        extra = set(options) - _STEPS[name][1]
        if extra:
            raise ParameterError(
                f"{path!r}: step {name!r} takes {sorted(_STEPS[name][1])}, not {sorted(extra)}."
            )
        steps.append((name, options))
    output = str(spec["output"])
    if "{stem}" not in output and "{name}" not in output and len(inputs) > 1:
        raise ParameterError(f"{path!r}: with several inputs, 'output' must contain {{stem}} or {{name}}.")
    if not os.path.isabs(output) and "://" not in output:
        output = str(base / output)
    state = Path(spec["state"]) if spec.get("state") else base / ".diffdask-pipeline"
    if not state.is_absolute():
        state = base / state
    return Pipeline(inputs, output, state, steps, source=str(file))


@dataclass
class StepReport:
    """What happened to one step of one input."""

    source: str
    step: str
    status: str  # "done", "skipped" (done before), "failed", "not run" (an earlier step failed)
    seconds: float = 0.0
    message: str = ""


@dataclass
class RunReport:
    """All step reports of a pipeline run."""

    steps: list[StepReport] = field(default_factory=list)

    @property
    def failed_inputs(self) -> list[str]:
        return sorted({r.source for r in self.steps if r.status == "failed"})


def run_pipeline(pipeline: Pipeline, on_step: Callable[[StepReport], None] | None = None) -> RunReport:
    """Run every step on every input, skipping what is done and continuing past failures.

    Steps compute on the current Dask scheduler (connect a client first for a cluster).

    Parameters
    ----------
    pipeline : Pipeline
        From `load_pipeline`.
    on_step : callable, optional
        Called with each `StepReport` as it is decided (progress display).
    """
    report = RunReport()
    for source in pipeline.inputs:
        store = pipeline.store_for(source)
        failed = False
        rerun = False  # once a step runs again, every later step does too
        key = ""
        for index, (name, options) in enumerate(pipeline.steps):
            key = pipeline.step_key(source, index, key)
            if failed:
                entry = StepReport(source, name, "not run", message="an earlier step failed")
            elif not rerun and pipeline.is_done(source, index, name, key):
                entry = StepReport(source, name, "skipped", message="done in an earlier run")
            else:
                t0 = time.perf_counter()
                try:
                    summary = _STEPS[name][0](source, store, options)
                except (DiffdaskError, OSError, ValueError, RuntimeError) as exc:
                    failed = True
                    where = traceback.extract_tb(exc.__traceback__)[-1]
                    entry = StepReport(
                        source, name, "failed", time.perf_counter() - t0,
                        f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})",
                    )
                else:
                    seconds = time.perf_counter() - t0
                    rerun = True
                    pipeline.mark_done(source, index, name, {"store": store, "options": options, "key": key,
                                                             "seconds": seconds, "summary": summary})
                    entry = StepReport(source, name, "done", seconds, summary)
            report.steps.append(entry)
            if on_step is not None:
                on_step(entry)
    return report
