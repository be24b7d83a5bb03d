"""tissuesim: a GPU-accelerated spatial tissue simulator.

CAR-T cells against B cells and plasma cells in muscle, lung and joint tissue, on CuPy kernels
or NumPy. Python entry points::

    import tissuesim
    cfg = tissuesim.load_config(["tissue=lung", "grid=tiny", "duration_days=2"])
    sim = tissuesim.Simulation(cfg)
    sim.run()
    run = tissuesim.open_run("runs/2026-11-27/10-00-00")   # read a run's snapshots.h5
"""

from __future__ import annotations

from tissuesim.provenance import version as _version

__version__ = _version()

__all__ = ["Simulation", "__version__", "load_config", "open_run", "run_to_directory"]


def load_config(overrides: list[str] | None = None):
    """Compose the run configuration from conf/ with Hydra overrides, validated.

    overrides : e.g. ["tissue=lung", "grid=tiny", "seed=3"]. Returns a DictConfig without the
    hydra node. Raises tissuesim.config.ConfigError (one line) on a bad value.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tissuesim.config import conf_dir, validate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    validate(cfg)
    return cfg


def __getattr__(name):
    # Lazy imports keep `import tissuesim` light (no Hydra/h5py until needed).
    if name == "Simulation":
        from tissuesim.simulation import Simulation

        return Simulation
    if name == "open_run":
        from tissuesim.io.hdf5 import open_run

        return open_run
    if name == "run_to_directory":
        from tissuesim.runner import run_to_directory

        return run_to_directory
    raise AttributeError(name)
