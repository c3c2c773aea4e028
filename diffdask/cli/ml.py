"""Neural-network commands: the ``train`` group (``hits``, ``geometry``) and ``predict``."""

from __future__ import annotations

import click

from diffdask.cli._common import (
    cluster_client,
    console,
    fail_clearly,
    main,
    overwrite_result_option,
    run_with_progress,
    scheduler_option,
    seed_option,
    workers_option,
)


@main.group()
def train() -> None:
    """Train neural networks on labelled frame stacks."""


@train.command(name="hits")
@click.argument("store")
@click.option("--label", default="single_hit", show_default=True, help="Boolean per-frame label (True = positive).")
@click.option("--out", type=click.Path(), required=True, help="Directory for the k-fold ensemble.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimisation steps per fold.")
@click.option("--folds", type=int, default=5, show_default=True, help="k of the k-fold ensemble.")
@click.option("--more-sh", is_flag=True, help="High-recall variant: 5 % positives and class weights 0.9/0.1.")
@click.option("--crop", nargs=2, type=int, default=(192, 96), show_default=True, help="Input patch (h w) around the beam.")
@click.option("--width", type=int, default=16, show_default=True, help="Filters of the first stage (the paper: 16).")
@seed_option
@scheduler_option
@workers_option
@fail_clearly
def train_hits(store: str, label: str, out: str, steps: int, folds: int, more_sh: bool, crop: tuple[int, int],
               width: int, seed: int, scheduler: str | None, workers: int | None) -> None:
    """Train the single-hit classifier ensemble (Assalauova et al. 2022) on STORE's LABEL."""
    from rich.progress import Progress

    from diffdask.io import open_frames
    from diffdask.ml.preprocess import Preprocess
    from diffdask.ml.train import TrainConfig, train_classifier

    config = TrainConfig(arch_kwargs={"width": width}, preprocess=Preprocess(crop=crop), steps=steps, k_folds=folds,
                         seed=seed, positive_fraction=0.05 if more_sh else 0.02,
                         class_weights=(0.9, 0.1) if more_sh else None)
    with cluster_client(scheduler, workers), Progress(console=console) as bar:
        task = bar.add_task("training", total=steps * folds)
        result = train_classifier(open_frames(store), label, out, config,
                                  progress=lambda step, total, loss: bar.update(task, advance=1,
                                                                                description=f"loss {loss:.4f}"))
    for fold in result.folds:
        console.print(f"fold {fold['fold']}: precision {fold['precision']:.3f} recall {fold['recall']:.3f} "
                      f"F1 {fold['f1']:.3f}", highlight=False)
    console.print(f"ensemble of {len(result.models)} models in {out}", highlight=False)


@train.command(name="geometry")
@click.argument("store")
@click.option("--out", type=click.Path(), required=True)
@click.option("--targets", default="beam_center_y,beam_center_x,pitch_deg,yaw_deg", show_default=True)
@click.option("--steps", type=int, default=3000, show_default=True)
@click.option("--width", type=int, default=64, show_default=True, help="Filters of the first stage (ResNet-18: 64).")
@click.option("--learning-rate", type=float, default=1e-4, show_default=True)
@seed_option
@scheduler_option
@workers_option
@fail_clearly
def train_geometry(store: str, out: str, targets: str, steps: int, width: int, learning_rate: float, seed: int,
                   scheduler: str | None, workers: int | None) -> None:
    """Train the beam-centre / tilt regressor on STORE's per-frame targets."""
    from diffdask.io import open_frames
    from diffdask.ml.preprocess import Preprocess
    from diffdask.ml.train import TrainConfig, train_regressor

    config = TrainConfig(architecture="GeometryRegressor", arch_kwargs={"width": width},
                         preprocess=Preprocess(scale="log1p"), steps=steps, learning_rate=learning_rate, seed=seed)
    with cluster_client(scheduler, workers):
        result = train_regressor(open_frames(store), [t.strip() for t in targets.split(",")], out, config)
    for name, mae in result["mae"].items():
        console.print(f"{name}: mean absolute error {mae:.4g} on held-out frames", highlight=False)


@main.command(name="predict")
@click.argument("store")
@click.option("--model", "model_dir", type=click.Path(), required=True,
              help="A model .pt file, or a directory of an ensemble (fold_*/model.pt).")
@click.option("--mirror", is_flag=True, help="Test-time mirroring (classifiers).")
@click.option("--group", default="predict", show_default=True, help="Result group: results/GROUP.")
@overwrite_result_option
@scheduler_option
@workers_option
@fail_clearly
def predict_command(store: str, model_dir: str, mirror: bool, group: str, overwrite: bool, scheduler: str | None,
                    workers: int | None) -> None:
    """Run a trained model (or ensemble) over every frame of STORE; save the outputs beside the frames."""
    from pathlib import Path

    from diffdask.io import open_frames, save_results
    from diffdask.ml import predict
    from diffdask.ml.train import ensemble_paths

    paths = ensemble_paths(model_dir) if Path(model_dir).is_dir() else [model_dir]
    with cluster_client(scheduler, workers) as client:
        out = predict(open_frames(store), paths, mirror=mirror)
        run_with_progress(client, save_results(out, store, group, overwrite=overwrite, compute=False))
    console.print(f"wrote results/{group} ({', '.join(map(str, out.output.values))}) for {out.sizes['frame']} frames",
                  highlight=False)
