"""Figures and movies of a run: snapshot panels, a timeseries figure, an MP4/GIF movie.

Everything reads through :func:`tissuesim.open_run`, so it works on a run that is still being
written (SWMR) as well as on a finished one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tissuesim.io.hdf5 import RunReader, open_run

# Colours for the cell types (colour-blind-safe Okabe-Ito palette), by name.
CELL_COLOURS = {
    "b_cell": "#0072B2",
    "plasmablast": "#56B4E9",
    "plasma_cell": "#009E73",
    "cd19_car_t": "#D55E00",
    "bcma_car_t": "#E69F00",
    "anti_car_t": "#CC79A7",
    "macrophage": "#000000",
}
PANEL_SIZE_IN = (12.0, 5.0)
TIMESERIES_SIZE_IN = (12.0, 9.0)


def _mpl():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed (and none on a cluster node)
    import matplotlib.pyplot as plt

    return plt


def _plane(vol: np.ndarray, z: str | int) -> np.ndarray:
    """(ny, nx) image of a (nz, ny, nx) volume: the z-slice ``z`` or 'max' projection ('mid' = centre)."""
    if vol.shape[0] == 1:
        return vol[0]
    if z == "max":
        return vol.max(axis=0)
    k = vol.shape[0] // 2 if z == "mid" else int(z)
    return vol[k]


def _cells_in_plane(cells: dict, shape, dx: float, z: str | int) -> np.ndarray:
    """Mask of cells to draw: all in 2D or for a projection, else those within the slice."""
    n = len(cells["id"])
    if shape[0] == 1 or z == "max" or n == 0:
        return np.ones(n, dtype=bool)
    k = shape[0] // 2 if z == "mid" else int(z)
    zc = cells["position"][:, 2]
    return (zc >= k * dx) & (zc < (k + 1) * dx)


def _scale_bar(ax, extent_um: float, color: str) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    nice = [10, 20, 50, 100, 200, 250, 500, 1000, 2000, 5000]
    length = max([v for v in nice if v <= extent_um / 4] or [nice[0]])
    label = f"{length / 1000:g} mm" if length >= 1000 else f"{length:g} um"
    ax.add_artist(
        AnchoredSizeBar(
            ax.transData,
            length,
            label,
            "lower right",
            pad=0.4,
            color=color,
            frameon=False,
            size_vertical=extent_um / 150,
        )
    )


def snapshot_figure(run: RunReader, index: int, field: str, z: str | int = "mid", vmax: float | None = None):
    """Matplotlib figure for snapshot ``index``: tissue + cells, and ``field`` with its colour bar."""
    plt = _mpl()
    from matplotlib.colors import ListedColormap

    shape = run.shape
    dx = float(run.attrs["dx_um"])
    t = run.times[index]
    extent = (0, shape[2] * dx, 0, shape[1] * dx)
    fig, axes = plt.subplots(1, 2, figsize=PANEL_SIZE_IN, dpi=100, constrained_layout=True)
    cells = run.agents(index)
    types = run.cell_types
    sel = _cells_in_plane(cells, shape, dx, z)

    labels = run.labels
    ax = axes[0]
    if labels is not None:
        names = run.label_names
        cmap = ListedColormap(plt.get_cmap("Pastel1")(np.linspace(0, 1, max(len(names), 2))))
        im = ax.imshow(
            _plane(labels, z),
            origin="lower",
            extent=extent,
            cmap=cmap,
            vmin=-0.5,
            vmax=len(names) - 0.5,
            interpolation="nearest",
        )
        cb = fig.colorbar(im, ax=ax, ticks=range(len(names)), fraction=0.046)
        cb.ax.set_yticklabels(names)
    for code, name in enumerate(types):
        m = sel & (cells["type"] == code)
        if m.any():
            p = cells["position"][m]
            ax.scatter(
                p[:, 0],
                p[:, 1],
                s=6,
                c=CELL_COLOURS.get(name, "grey"),
                label=f"{name} ({m.sum()})",
                linewidths=0,
            )
    if sel.any():
        ax.legend(loc="upper right", fontsize=7, markerscale=2, framealpha=0.8)
    ax.set_title(f"tissue and cells, day {t:.2f}")

    ax = axes[1]
    vol = run.field(field, index)
    units = run.f["fields"][field].attrs.get("units", "")
    im = ax.imshow(
        _plane(vol, z),
        origin="lower",
        extent=extent,
        cmap="viridis",
        vmin=0,
        vmax=vmax,
        interpolation="nearest",
    )
    fig.colorbar(im, ax=ax, fraction=0.046, label=f"{field} ({units})")
    ax.set_title(f"{field}, day {t:.2f}" + ("" if shape[0] == 1 else f" (z {z})"))
    for a, colour in zip(axes, ("black", "white")):
        a.set_xlabel("x (um)")
        a.set_ylabel("y (um)")
        _scale_bar(a, extent[1], colour)
    return fig


def timeseries_figure(run: RunReader):
    """Cell counts, blood CAR-T and B cells, autoantibody, IL-6, CRS grade and damage, with therapy events."""
    plt = _mpl()
    ts = run.timeseries()
    t = ts["time"]
    panels = [
        ("cells in the tissue patch", [k for k in ts if k.startswith("count_")], "cells"),
        (
            "blood",
            [
                k
                for k in ("blood_cd19_car_t_per_ul", "blood_bcma_car_t_per_ul", "blood_b_cell_per_ul")
                if k in ts
            ],
            "per uL",
        ),
        (
            "autoantibody",
            [k for k in ("serum_autoantibody_rel", "mean_autoantibody") if k in ts],
            "rel. to baseline",
        ),
        ("IL-6", [k for k in ("serum_il6_pg_per_ml", "mean_il6") if k in ts], "pg/mL"),
        ("CRS grade", [k for k in ("crs_grade",) if k in ts], "grade"),
        ("damage", [k for k in ("mean_damage",) if k in ts], "rel"),
    ]
    fig, axes = plt.subplots(3, 2, figsize=TIMESERIES_SIZE_IN, dpi=100, sharex=True, constrained_layout=True)
    events = run.events()
    for ax, (title, keys, unit) in zip(axes.flat, panels):
        for k in keys:
            ax.plot(t, ts[k], label=k.removeprefix("count_"))
        for ev in events:
            ax.axvline(ev["day"], color="crimson", lw=0.8, ls="--")
        ax.set_title(title)
        ax.set_ylabel(unit)
        if keys:
            ax.legend(fontsize=7)
        else:
            ax.text(
                0.5, 0.5, "not in this run", ha="center", va="center", transform=ax.transAxes, color="grey"
            )
    for ev in events:
        axes.flat[0].annotate(
            ev["what"],
            (ev["day"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            va="top",
            color="crimson",
        )
    for ax in axes[-1]:
        ax.set_xlabel("day")
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path)  # fixed figure size and dpi: the PNG size is known in advance
    _mpl().close(fig)
    return path


def render_run(
    run_dir: str | Path,
    field: str = "il6",
    z: str | int = "mid",
    out: str | Path | None = None,
    snapshots: str = "all",
    movie: bool = True,
) -> dict:
    """Write figures of a run into ``out`` (default RUN_DIR/figures); returns what was written.

    snapshots : 'all', 'last' or a comma-separated list of indices.
    Returns {'panels': [png...], 'timeseries': png, 'movie': mp4/gif or None}.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "figures"
    out.mkdir(parents=True, exist_ok=True)
    with open_run(run_dir) as run:
        if field not in run.field_names:
            raise ValueError(f"--field={field}: allowed: {', '.join(run.field_names)}")
        n = len(run.times)
        if snapshots == "all":
            idx = list(range(n))
        elif snapshots == "last":
            idx = [n - 1] if n else []
        else:
            idx = [int(s) % n for s in snapshots.split(",")]
        vmax = max((float(run.field(field, i).max()) for i in idx), default=1.0) or 1.0
        panels = [
            _save(snapshot_figure(run, i, field, z, vmax), out / f"snapshot_{i:04d}_{field}.png") for i in idx
        ]
        ts_png = _save(timeseries_figure(run), out / "timeseries.png")
    result = {"panels": [str(p) for p in panels], "timeseries": str(ts_png), "movie": None}
    if movie and len(panels) > 1:
        result["movie"] = str(make_movie(panels, out / f"movie_{field}"))
    (out / "figures.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def make_movie(frames: list[Path], stem: Path, fps: int = 5) -> Path:
    """MP4 (H.264 via imageio-ffmpeg) from PNG frames, or a GIF where ffmpeg is unavailable."""
    import imageio.v2 as imageio

    images = [imageio.imread(f) for f in frames]
    try:
        path = stem.with_suffix(".mp4")
        # macro_block_size=1: keep the exact frame size (figure sizes need not be multiples of 16)
        imageio.mimwrite(path, images, fps=fps, codec="libx264", macro_block_size=1, quality=8)
        return path
    except Exception:  # no ffmpeg backend: fall back to GIF, which Pillow writes on its own
        path = stem.with_suffix(".gif")
        imageio.mimwrite(path, images, duration=1.0 / fps, loop=0)
        return path
