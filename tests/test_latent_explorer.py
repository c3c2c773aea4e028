"""The latent-space explorer: data loading, selections, document, and a headless-Chromium run."""

from __future__ import annotations

import io
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest

import diffdask as dd
from diffdask import latent
from diffdask.simulate import Particle, detector_mask
from diffdask.viz import explorer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A 240-frame mixture store with summary and latent results."""
    path = tmp_path_factory.mktemp("explorer") / "mix.zarr"
    g = dd.Geometry((48, 48), 1.2e-3, 0.3, 6e-10)
    ds = dd.simulate_spi(
        240, g, Particle("icosahedral_shell", (65.0, 75.0)), single_hit_fraction=0.85,
        mask=detector_mask(g, gap_px=2, beamstop_radius_px=2), seed=9, chunks=80,
    )
    with dask.config.set(scheduler="synchronous"):
        dd.save_frames(ds, path)
        ds = dd.open_frames(path)
        dd.save_results(dd.summarize(ds), path, "summary")
        model, res = latent.sort_single_hits(ds, 3, crop=32)
        dd.save_results(res, path, "latent")
    return path


def test_explorer_data_columns_and_frames(store):
    data = explorer.ExplorerData(store)
    assert data.n_frames == 240 and data.latent.shape == (240, 3)
    assert {"latent 0", "latent 2", explorer.RESIDUAL_AXIS} <= set(data.axes)
    for name in ("single_hit", "n_particles", "fluence_scale", "summary/total", "summary/com_y",
                 "latent/single_hit", "latent/outlier_score"):
        assert data.columns[name].shape == (240,), name
    img = data.frame(7)
    raw = dd.open_frames(store)["frames"][7].values
    good = data.mask
    np.testing.assert_array_equal(img[good], raw[good])
    assert np.isnan(img[~good]).all()
    with pytest.raises(dd.ParameterError, match="outside"):
        data.frame(240)
    small = explorer.ExplorerData(store, max_points=50, seed=1)
    assert small.shown.size == 50 and np.all(np.diff(small.shown) > 0)


def test_selection_covers_all_frames_and_is_saved(store):
    data = explorer.ExplorerData(store, max_points=30)
    x, y = data.axes["latent 0"], data.axes["latent 1"]
    xs = np.array([x.min() - 1, np.median(x), np.median(x), x.min() - 1])
    ys = np.array([y.min() - 1, y.min() - 1, y.max() + 1, y.max() + 1])
    inside = data.frames_inside(xs, ys, "latent 0", "latent 1")
    np.testing.assert_array_equal(inside, x < np.median(x))
    where = data.save_selection(inside, "left_half")
    assert where == "results/left_half"
    saved = dd.open_results(store, "left_half")
    np.testing.assert_array_equal(saved["selected"].values, inside)
    data.save_selection(~inside, "left_half")  # saving again replaces it
    np.testing.assert_array_equal(dd.open_results(store, "left_half")["selected"].values, ~inside)


def test_autocorrelation_of_two_slits():
    # Intensity of two point scatterers 10 px apart: cos² fringes; the autocorrelation has
    # its zero-lag peak in the centre and side peaks at ±10 px.
    x = np.arange(64)
    pattern = np.tile(1 + np.cos(2 * np.pi * 10 * x / 64), (64, 1))
    auto = explorer.autocorrelation(pattern)
    assert auto[32, 32] == pytest.approx(1.0)
    assert auto[32, 42] == pytest.approx(0.5) and auto[32, 22] == pytest.approx(0.5)
    assert auto[32, 37] < 1e-9


def test_document_builds_with_and_without_hexbin(store):
    from bokeh.document import Document

    for hexbin_from in (10**9, 100):
        doc = Document()
        # explorer_app is what Jupyter's bokeh.io.show and the Bokeh server call with a document.
        explorer.explorer_app(store, hexbin_from=hexbin_from, max_points=100)(doc)
        data = explorer.ExplorerData(store, hexbin_from=hexbin_from, max_points=100)
        for name in ("latent_plot", "latent_source", "pattern_source", "frame_info", "save_selection"):
            assert doc.get_model_by_name(name) is not None, name
        hexes = doc.get_model_by_name("hex_source")  # in the document only when drawn
        assert (hexes is not None and len(hexes.data["counts"]) > 0) == data.hexbin
        assert len(doc.get_model_by_name("latent_source").data["x"]) == 100


def test_explorer_needs_a_latent_result(tmp_path):
    path = tmp_path / "plain.zarr"
    dd.save_frames(dd.make_frame_stack(np.ones((5, 8, 8), dtype=np.float32)), path)
    with pytest.raises(dd.StoreFormatError, match="diffdask latent"):
        explorer.ExplorerData(path)


# ------------------------------------------------------------------ headless Chromium
def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Debian chromium and chromium-driver are not installed and could not be "
                    "(`make test` installs them with apt-get when run as root)")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,950", "--hide-scrollbars"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    # An explicit driver path: selenium must not try to download one.
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _start_server(store: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(Path(dd.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diffdask.cli", "explore", str(store), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.startswith("diffdask explorer: "):
            return proc, line.split(": ", 1)[1].strip()
    proc.kill()
    raise AssertionError(f"the explorer did not start: {''.join(seen)}")


def _wait_for(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def _region(png: bytes, rect: dict) -> np.ndarray:
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    x0, y0 = int(rect["left"]), int(rect["top"])
    return img[y0 : y0 + int(rect["height"]), x0 : x0 + int(rect["width"])]


#: Page rectangle of a plot's drawing area (its frame), and screen position of source point i.
FRAME_RECT = """
const plot = Bokeh.documents[0].get_model_by_name(arguments[0]);
const view = Bokeh.index.find_one(plot);
if (view == null || !view.is_idle) return null;
const canvas = view.canvas_view.el.getBoundingClientRect();
const b = view.frame.bbox;
return {left: canvas.left + b.left, top: canvas.top + b.top, width: b.width, height: b.height};
"""
POINT_XY = """
const doc = Bokeh.documents[0];
const view = Bokeh.index.find_one(doc.get_model_by_name('latent_plot'));
const src = doc.get_model_by_name('latent_source');
const i = arguments[0];
const canvas = view.canvas_view.el.getBoundingClientRect();
return {x: canvas.left + view.frame.x_scale.compute(src.data.x[i]),
        y: canvas.top + view.frame.y_scale.compute(src.data.y[i]), frame: src.data.frame[i]};
"""


def test_explorer_in_headless_chromium(store, tmp_path):
    driver = _driver()
    proc, url = _start_server(store)
    try:
        driver.get(url)
        _wait_for(driver, "return window.Bokeh && Bokeh.documents.length > 0 && "
                          "Bokeh.documents[0].get_model_by_name('latent_plot') != null")
        rect = _wait_for_rect(driver, "latent_plot")
        time.sleep(0.5)  # WebGL draws on the next animation frame
        before = driver.get_screenshot_as_png()
        plot_area = _region(before, rect)
        # Rendered: the plot area holds points of several colours, not a blank canvas.
        assert plot_area.std() > 5, "latent plot area is blank"
        assert len(np.unique(plot_area.reshape(-1, 3), axis=0)) > 20

        # Tap the point nearest the centre of the view: its frame's pattern must appear.
        n = int(driver.execute_script("return Bokeh.documents[0].get_model_by_name('latent_source').data.x.length"))
        points = [driver.execute_script(POINT_XY, i) for i in range(n)]
        cx, cy = rect["left"] + rect["width"] / 2, rect["top"] + rect["height"] / 2
        target = min(points, key=lambda p: (p["x"] - cx) ** 2 + (p["y"] - cy) ** 2)
        for kind in ("mousePressed", "mouseReleased"):
            driver.execute_cdp_cmd("Input.dispatchMouseEvent", {
                "type": kind, "x": target["x"], "y": target["y"], "button": "left", "clickCount": 1})
        frame = int(target["frame"])
        _wait_for(driver, f"return Bokeh.documents[0].get_model_by_name('frame_info').text.includes('frame {frame}<')")
        title = driver.execute_script(
            "return Bokeh.documents[0].get_model_by_name('pattern_plot').title.text")
        assert title.startswith(f"frame {frame}:")
        time.sleep(0.5)
        after = driver.get_screenshot_as_png()
        pattern = _region(after, _wait_for_rect(driver, "pattern_plot"))
        blank = _region(before, _wait_for_rect(driver, "pattern_plot"))
        assert pattern.std() > 10 and np.abs(pattern - blank).mean() > 5, "the pattern did not appear"
        (tmp_path / "explorer.png").write_bytes(after)
        target_png = os.environ.get("DIFFDASK_EXPLORER_SCREENSHOT")
        if target_png:
            Path(target_png).write_bytes(after)
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(timeout=10)


def _wait_for_rect(driver, name: str) -> dict:
    return _wait_for(driver, FRAME_RECT.replace("arguments[0]", repr(name)))


def test_lasso_then_save_through_the_app(store):
    """The app's callbacks: a lasso polygon (all frames inside) saved with the button."""
    from bokeh.document import Document
    from bokeh.events import ButtonClick, SelectionGeometry

    doc = Document()
    data = explorer.ExplorerData(store, max_points=40)
    explorer.build_document(doc, data)
    doc.get_model_by_name("x_axis").value = "latent 0"
    doc.get_model_by_name("y_axis").value = "latent 1"
    plot = doc.get_model_by_name("latent_plot")
    x = data.axes["latent 0"]
    lo, mid, hi = x.min() - 1, np.median(x), 1e9
    poly = {"type": "poly", "x": [lo, mid, mid, lo], "y": [-hi, -hi, hi, hi]}
    plot._trigger_event(SelectionGeometry(plot, geometry=poly, final=True))
    assert doc.get_model_by_name("status").text.startswith(f"{int((x < mid).sum())} frames inside")
    doc.get_model_by_name("selection_name").value = "lasso"
    button = doc.get_model_by_name("save_selection")
    button._trigger_event(ButtonClick(button))
    assert "saved" in doc.get_model_by_name("status").text
    np.testing.assert_array_equal(dd.open_results(store, "lasso")["selected"].values, x < mid)
    assert "lasso/selected" in doc.get_model_by_name("colour_by").options
