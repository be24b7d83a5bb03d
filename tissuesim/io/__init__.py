"""Output writers and readers: HDF5 snapshots, summaries, tables."""

from tissuesim.io.hdf5 import RunReader, SnapshotWriter, open_run

__all__ = ["RunReader", "SnapshotWriter", "open_run"]
