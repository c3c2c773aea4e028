"""The latent-space explorer: a Bokeh server app over a frame-stack store.

Left: the latent space (any two components, or a component against log residual) as a
scatter coloured by any per-frame variable of the store (ground-truth labels, flags, totals,
centres of mass from ``diffdask reduce``...). Stacks of ≥ ``hexbin_from`` frames are drawn as
a hexbin density of *all* frames under a seeded random subset of ``max_points`` pickable
points, so the browser stays responsive at 10⁶ frames. Right: the tapped frame's diffraction
pattern (log scale), read on demand from the Zarr store (one inner chunk, a few ms), and its
real-space view, the autocorrelation |F⁻¹(I)|. A lasso (or box) selection is saved as a bool
per-frame variable with `save_results`; it covers every frame inside the drawn region, not
only the displayed subset.

Run it with ``diffdask explore STORE`` (a Bokeh server) or, in Jupyter::

    from bokeh.io import output_notebook, show
    from diffdask.viz.explorer import explorer_app
    output_notebook()
    show(explorer_app("run.zarr"))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from diffdask.errors import ParameterError, StoreFormatError

#: Stacks with at least this many frames are drawn as a hexbin density plus a pickable subset.
HEXBIN_FROM = 100_000
#: Pickable points drawn (a seeded random subset when the stack is larger).
MAX_POINTS = 20_000
RESIDUAL_AXIS = "log₁₀ residual"


@dataclass
class ExplorerData:
    """Everything the app shows, loaded once per server: latent coordinates and per-frame columns.

    Parameters
    ----------
    store : str or os.PathLike
        A frame-stack store with a latent result (``diffdask latent STORE``).
    group : str
        Result group of the latent coordinates.
    max_points : int
        Pickable points drawn.
    hexbin_from : int
        Frame count from which a hexbin density of all frames is drawn under the points.
    seed : int
        Seed of the displayed subset.
    """

    store: Any
    group: str = "latent"
    max_points: int = MAX_POINTS
    hexbin_from: int = HEXBIN_FROM
    seed: int = 0
    latent: np.ndarray = field(init=False)
    axes: dict[str, np.ndarray] = field(init=False)
    columns: dict[str, np.ndarray] = field(init=False)
    shown: np.ndarray = field(init=False)
    mask: np.ndarray = field(init=False)
    n_frames: int = field(init=False)

    def __post_init__(self) -> None:
        from diffdask.frames import get_mask
        from diffdask.io import list_results, open_frames, open_results

        if int(self.max_points) < 1:
            raise ParameterError(f"max_points must be ≥ 1, got {self.max_points}.")
        ds = open_frames(self.store)
        groups = list_results(self.store)
        if self.group not in groups:
            raise StoreFormatError(
                f"{self.store} has no result {self.group!r} (it has {groups or 'none'}); "
                f"compute the latent space first: diffdask latent {self.store}"
            )
        res = open_results(self.store, self.group)
        if "latent" not in res:
            raise StoreFormatError(f"results/{self.group} of {self.store} holds no 'latent' variable.")
        self.latent = np.asarray(res["latent"].values, dtype=np.float64)
        self.n_frames = int(self.latent.shape[0])
        self.axes = {f"latent {i}": self.latent[:, i] for i in range(self.latent.shape[1])}
        if "residual" in res:
            r = np.asarray(res["residual"].values, dtype=np.float64)
            self.axes[RESIDUAL_AXIS] = np.log10(np.maximum(r, np.finfo(np.float64).tiny))
        self.columns = {"frame index": np.arange(self.n_frames, dtype=np.float64)}
        self.columns.update(_per_frame_columns(ds, ""))
        for g in groups:
            self.columns.update(_per_frame_columns(open_results(self.store, g), f"{g}/"))
        self.mask = get_mask(ds)
        rng = np.random.default_rng(self.seed)
        if self.n_frames > self.max_points:
            self.shown = np.sort(rng.choice(self.n_frames, int(self.max_points), replace=False))
        else:
            self.shown = np.arange(self.n_frames)
        self._frames: Any = None

    @property
    def hexbin(self) -> bool:
        """Whether the density of all frames is drawn (large stacks)."""
        return self.n_frames >= self.hexbin_from

    def frame(self, index: int) -> np.ndarray:
        """One frame (float64, masked pixels NaN), read from the store on demand."""
        import zarr

        if self._frames is None:
            # zarr directly: reading one frame decodes one inner chunk, not a whole Dask chunk.
            self._frames = zarr.open_group(str(self.store), mode="r")["frames"]
        if not 0 <= int(index) < self.n_frames:
            raise ParameterError(f"frame index {index} is outside 0..{self.n_frames - 1}.")
        img = np.asarray(self._frames[int(index)], dtype=np.float64)
        img[~self.mask | ~np.isfinite(img)] = np.nan
        return img

    def frames_inside(self, xs: np.ndarray, ys: np.ndarray, x_axis: str, y_axis: str) -> np.ndarray:
        """Bool per frame: inside the polygon (xs, ys) of the (x_axis, y_axis) view, all frames."""
        from matplotlib.path import Path

        pts = np.column_stack([self.axes[x_axis], self.axes[y_axis]])
        return Path(np.column_stack([xs, ys])).contains_points(pts)

    def save_selection(self, selected: np.ndarray, name: str) -> str:
        """Store a bool per-frame selection in ``results/<name>`` (variable ``selected``)."""
        from diffdask.io import save_results

        sel = np.asarray(selected, dtype=bool)
        if sel.shape != (self.n_frames,):
            raise ParameterError(f"a selection needs one bool per frame ({self.n_frames}), got {sel.shape}.")
        results = xr.Dataset(
            {"selected": (("frame",), sel)},
            attrs={"source": "diffdask explorer", "latent_group": self.group, "n_selected": int(sel.sum())},
        )
        save_results(results, self.store, name, overwrite=True)
        return f"results/{name}"


def _per_frame_columns(ds: xr.Dataset, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for name, var in ds.data_vars.items():
        if var.dims == ("frame",) and var.dtype.kind in "biuf":
            out[f"{prefix}{name}"] = np.asarray(var.values, dtype=np.float64)
    return out


def autocorrelation(pattern: np.ndarray) -> np.ndarray:
    """Real-space view of a diffraction pattern: |F⁻¹(I)|, centred, normalised to max 1.

    Parameters
    ----------
    pattern : ndarray, shape (ny, nx)
        Intensities; NaN (masked) pixels count as 0.

    Returns
    -------
    ndarray, shape (ny, nx)
        The modulus of the autocorrelation of the exit wave (Wiener–Khinchin), zero lag in
        the centre.
    """
    intensity = np.where(np.isfinite(pattern), pattern, 0.0)
    auto = np.abs(np.fft.fftshift(np.fft.ifft2(intensity)))
    peak = auto.max()
    return auto / peak if peak > 0 else auto


def _log_image(img: np.ndarray) -> np.ndarray:
    return np.log10(1.0 + np.maximum(img, 0.0))


def explorer_app(store: Any, **options: Any) -> Callable[[Any], None]:
    """The explorer as a Bokeh app function ``modify_doc(doc)``.

    Pass it to ``bokeh.io.show`` in Jupyter, or to a Bokeh ``Server``.

    Parameters
    ----------
    store : str or os.PathLike
        A frame-stack store with a latent result.
    **options
        `ExplorerData` options (``group``, ``max_points``, ``hexbin_from``, ``seed``).
    """
    data = ExplorerData(store, **options)

    def modify_doc(doc: Any) -> None:
        build_document(doc, data)

    return modify_doc


def build_document(doc: Any, data: ExplorerData) -> None:
    """Lay out the explorer in the Bokeh document ``doc``."""
    from bokeh.events import SelectionGeometry
    from bokeh.layouts import column, row
    from bokeh.models import (
        Button,
        ColorBar,
        ColumnDataSource,
        Div,
        HoverTool,
        LassoSelectTool,
        LinearColorMapper,
        Select,
        TapTool,
        TextInput,
    )
    from bokeh.palettes import Greys256, Inferno256, Viridis256
    from bokeh.plotting import figure
    from bokeh.util.hex import cartesian_to_axial

    axis_names = list(data.axes)
    x_sel = Select(title="x axis", value=axis_names[0], options=axis_names, name="x_axis")
    # Latent 0 against log residual is where multiple hits separate (see diffdask.latent);
    # the other components hold the orientation and size of the single hits.
    y_default = RESIDUAL_AXIS if RESIDUAL_AXIS in data.axes else axis_names[min(1, len(axis_names) - 1)]
    y_sel = Select(title="y axis", value=y_default, options=axis_names, name="y_axis")
    colour_names = list(data.columns)
    preferred = [c for c in ("single_hit", f"{data.group}/single_hit", f"{data.group}/outlier_score") if c in data.columns]
    c_sel = Select(title="colour by", value=(preferred or colour_names)[0], options=colour_names, name="colour_by")

    shown = data.shown

    def point_data() -> dict[str, Any]:
        c = data.columns[c_sel.value][shown]
        return {"x": data.axes[x_sel.value][shown], "y": data.axes[y_sel.value][shown], "c": c, "frame": shown}

    source = ColumnDataSource(point_data(), name="latent_source")
    mapper = LinearColorMapper(palette=Viridis256, name="colour_mapper")

    def update_mapper() -> None:
        c = data.columns[c_sel.value]
        finite = c[np.isfinite(c)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        mapper.low, mapper.high = lo, hi if hi > lo else lo + 1.0

    update_mapper()
    plot = figure(
        title=f"latent space of {data.n_frames} frames"
        + (f" (density of all, {shown.size} pickable points)" if data.hexbin else ""),
        width=560,
        height=520,
        tools="pan,wheel_zoom,box_select,reset,save",
        name="latent_plot",
        output_backend="webgl",
    )
    plot.xaxis.axis_label, plot.yaxis.axis_label = x_sel.value, y_sel.value
    hex_source = ColumnDataSource({"q": [], "r": [], "counts": []}, name="hex_source")
    if data.hexbin:
        hex_mapper = LinearColorMapper(palette=Greys256[::-1][40:], low=0, high=1)
        plot.hex_tile(q="q", r="r", size=1.0, source=hex_source, line_color=None,
                      fill_color={"field": "counts", "transform": hex_mapper}, name="density")

        def update_hex() -> None:
            x, y = data.axes[x_sel.value], data.axes[y_sel.value]
            # ~60 hexagons across each axis: the size sets the vertical extent, the aspect
            # scale the horizontal one (the two axes have unrelated units).
            span_x, span_y = max(float(np.ptp(x)), 1e-12), max(float(np.ptp(y)), 1e-12)
            size, aspect = span_y / 60, span_y / span_x
            q, r = cartesian_to_axial(x, y, size, "pointytop", aspect_scale=aspect)
            qr, counts = np.unique(np.column_stack([q, r]), axis=0, return_counts=True)
            glyph = plot.renderers[0].glyph
            glyph.size, glyph.aspect_scale = size, aspect
            hex_source.data = {"q": qr[:, 0], "r": qr[:, 1], "counts": np.log1p(counts)}
            hex_mapper.high = float(np.log1p(counts.max()))

        update_hex()
    points = plot.scatter(
        "x", "y", source=source, size=5 if not data.hexbin else 3, alpha=0.8 if not data.hexbin else 0.5,
        color={"field": "c", "transform": mapper}, line_color=None,
        selection_color="red", nonselection_alpha=0.25, name="points",
    )
    plot.add_tools(
        TapTool(renderers=[points]),
        LassoSelectTool(renderers=[points]),
        HoverTool(renderers=[points], tooltips=[("frame", "@frame"), ("colour", "@c{0.000}")]),
    )
    plot.toolbar.active_tap = plot.select_one(TapTool)
    plot.add_layout(ColorBar(color_mapper=mapper, width=10, title=c_sel.value, name="colour_bar"), "right")

    ny, nx = data.mask.shape
    pattern_source = ColumnDataSource({"image": [np.full((ny, nx), np.nan)]}, name="pattern_source")
    auto_source = ColumnDataSource({"image": [np.zeros((ny, nx))]}, name="auto_source")
    pattern_plot = figure(title="diffraction pattern: tap a point", width=380, height=360,
                          x_range=(0, nx), y_range=(0, ny), tools="pan,wheel_zoom,reset,save", name="pattern_plot")
    pattern_plot.image("image", x=0, y=0, dw=nx, dh=ny, source=pattern_source,
                       color_mapper=LinearColorMapper(palette=Inferno256, nan_color="#4060a0"))
    auto_plot = figure(title="autocorrelation |F⁻¹(I)| (log₁₀)", width=380, height=360,
                       x_range=(0, nx), y_range=(0, ny), tools="pan,wheel_zoom,reset,save", name="auto_plot")
    auto_plot.image("image", x=0, y=0, dw=nx, dh=ny, source=auto_source,
                    color_mapper=LinearColorMapper(palette=Greys256, low=-4, high=0))
    info = Div(text="Tap a point to see its pattern; draw a lasso to select frames.", width=760, name="frame_info")
    name_input = TextInput(title="save selection as results/…", value="selection", name="selection_name")
    save_button = Button(label="Save selection", button_type="primary", name="save_selection")
    status = Div(text="", width=560, name="status")
    geometry: dict[str, Any] = {}

    def show_frame(index: int) -> None:
        img = data.frame(index)
        pattern_source.data = {"image": [_log_image(img)]}
        auto_source.data = {"image": [np.log10(np.maximum(autocorrelation(img), 1e-4))]}
        pattern_plot.title.text = f"frame {index}: log₁₀(1 + photons)"
        values = ", ".join(
            f"{k} = {v[index]:.4g}" for k, v in data.columns.items() if k != "frame index" and np.isfinite(v[index])
        )
        info.text = f"<b>frame {index}</b> — {values}"

    def on_selection(attr: str, old: list[int], new: list[int]) -> None:
        if len(new) == 1:
            geometry.clear()
            show_frame(int(source.data["frame"][new[0]]))
        elif new:
            status.text = f"{len(new)} displayed points selected"

    def on_geometry(event: Any) -> None:
        geo = event.geometry
        if not event.final or geo.get("type") not in ("poly", "rect"):
            return
        if geo["type"] == "rect":
            xs = np.array([geo["x0"], geo["x1"], geo["x1"], geo["x0"]])
            ys = np.array([geo["y0"], geo["y0"], geo["y1"], geo["y1"]])
        else:
            xs, ys = np.asarray(geo["x"], dtype=float), np.asarray(geo["y"], dtype=float)
        geometry.update(xs=xs, ys=ys, axes=(x_sel.value, y_sel.value))
        n = int(data.frames_inside(xs, ys, x_sel.value, y_sel.value).sum())
        status.text = f"{n} frames inside the selection (all frames, not only those drawn)"

    def on_save() -> None:
        name = name_input.value.strip()
        if geometry:
            selected = data.frames_inside(geometry["xs"], geometry["ys"], *geometry["axes"])
        else:
            selected = np.zeros(data.n_frames, dtype=bool)
            selected[np.asarray(source.data["frame"])[source.selected.indices]] = True
        if not selected.any():
            status.text = "nothing selected: tap a point or draw a lasso first"
            return
        try:
            where = data.save_selection(selected, name)
        except Exception as exc:  # shown in the page: the server must keep running
            status.text = f"<span style='color:#b00'>not saved: {exc}</span>"
            return
        data.columns[where.removeprefix("results/") + "/selected"] = selected.astype(np.float64)
        c_sel.options = list(data.columns)
        status.text = f"saved {int(selected.sum())} frames as {where}/selected"

    def on_axes(attr: str, old: str, new: str) -> None:
        plot.xaxis.axis_label, plot.yaxis.axis_label = x_sel.value, y_sel.value
        geometry.clear()
        source.selected.indices = []
        source.data = point_data()
        if data.hexbin:
            update_hex()

    def on_colour(attr: str, old: str, new: str) -> None:
        source.data = point_data()
        update_mapper()
        plot.select_one({"name": "colour_bar"}).title = new

    source.selected.on_change("indices", on_selection)
    plot.on_event(SelectionGeometry, on_geometry)
    save_button.on_click(on_save)
    x_sel.on_change("value", on_axes)
    y_sel.on_change("value", on_axes)
    c_sel.on_change("value", on_colour)
    controls = row(x_sel, y_sel, c_sel)
    doc.add_root(
        column(
            controls,
            row(plot, column(pattern_plot, auto_plot)),
            info,
            row(name_input, save_button),
            status,
            name="explorer",
        )
    )
    doc.title = f"diffdask explorer — {data.store}"


def serve_explorer(
    store: Any,
    port: int = 5006,
    address: str = "localhost",
    show: bool = False,
    allow_websocket_origin: list[str] | None = None,
    on_start: Callable[[str], None] | None = None,
    **options: Any,
) -> None:
    """Serve the explorer with a Bokeh server until interrupted.

    Parameters
    ----------
    store : str or os.PathLike
        A frame-stack store with a latent result.
    port : int
        TCP port (0: any free port).
    address : str
        Interface to listen on (``"0.0.0.0"`` for remote browsers; then also set
        ``allow_websocket_origin``).
    show : bool
        Open a browser tab.
    allow_websocket_origin : list of str, optional
        Hosts allowed to connect (default: the address and port).
    on_start : callable, optional
        Called with the app URL once the server listens.
    **options
        `ExplorerData` options.
    """
    from bokeh.application import Application
    from bokeh.application.handlers.function import FunctionHandler
    from bokeh.server.server import Server

    app = Application(FunctionHandler(explorer_app(store, **options)))
    if int(port) == 0:
        # Pick the free port here: the allowed websocket origins must name it.
        import socket

        with socket.socket() as sock:
            sock.bind((address, 0))
            port = sock.getsockname()[1]
    origins = allow_websocket_origin or [f"{address}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    server = Server({"/explorer": app}, port=int(port), address=address, allow_websocket_origin=origins)
    server.start()
    url = f"http://{address}:{server.port}/explorer"
    if on_start is not None:
        on_start(url)
    if show:
        server.io_loop.add_callback(server.show, "/explorer")
    server.io_loop.start()


__all__ = ["ExplorerData", "autocorrelation", "build_document", "explorer_app", "serve_explorer"]
