"""snapshots.xdmf: a light XML index that lets ParaView and VisIt open snapshots.h5.

The heavy data stay in the HDF5 file; the XDMF (version 2) file describes two temporal
collections that point into it with hyperslabs:

- ``fields``: per snapshot a cell-centred 3DCoRectMesh (node dimensions nz+1, ny+1, nx+1, origin
  at the outer corner of voxel (0, 0, 0), spacing dx in um; a 2D run is one voxel thick) with every
  field and the tissue labels as cell attributes;
- ``cells``: per snapshot a Polyvertex point set at the cell positions (x, y, z in um) with type,
  id and the other per-cell datasets as point attributes (rows offsets[k]:offsets[k+1]).

The writer rewrites the file (atomically) after every snapshot, so a run can be watched live.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_NUMBER = {"f": "Float", "i": "Int", "u": "UInt"}


def _number_type(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize == 1:
        return 'NumberType="UChar" Precision="1"'
    if dtype.kind == "i" and dtype.itemsize == 1:
        return 'NumberType="Char" Precision="1"'
    name = _NUMBER[dtype.kind]
    return f'NumberType="{name}" Precision="{dtype.itemsize}"'


def _slab(h5: str, path: str, full, start, count, dtype, dims=None) -> str:
    """A HyperSlab DataItem selecting ``count`` items from ``start`` of dataset ``path``.

    dims : shape of the result as the reader should see it (default ``count``).
    """
    r = len(full)
    ones = " ".join(["1"] * r)
    dims = " ".join(str(c) for c in (count if dims is None else dims))
    return (
        f'<DataItem ItemType="HyperSlab" Dimensions="{dims}" Type="HyperSlab">'
        f'<DataItem Dimensions="3 {r}" Format="XML">{" ".join(map(str, start))} {ones} {" ".join(map(str, count))}</DataItem>'
        f'<DataItem Dimensions="{" ".join(map(str, full))}" {_number_type(dtype)} Format="HDF">{h5}:{path}</DataItem>'
        "</DataItem>"
    )


def write_xdmf(
    xdmf_path: str | Path,
    h5_name: str,
    times: Sequence[float],
    offsets: Sequence[int],
    shape: Sequence[int],
    dx: float,
    origin: Sequence[float],
    fields: Sequence[str],
    agent_attrs: dict[str, np.dtype],
    has_labels: bool,
) -> None:
    """Write the XDMF index for the first len(times) snapshots.

    times : days (n_snap,). offsets : /agents/offsets (n_snap + 1,). shape : (nz, ny, nx).
    dx : voxel edge, um. origin : (x0, y0, z0) um. agent_attrs : per-cell datasets besides position
    ({'type': uint8, 'id': int64, ...}), each (total,).
    """
    nz, ny, nx = (int(s) for s in shape)
    n_snap = len(times)
    total = int(offsets[n_snap]) if n_snap else 0
    x0, y0, z0 = origin
    lines = [
        '<?xml version="1.0" ?>',
        '<Xdmf Version="2.0" xmlns:xi="http://www.w3.org/2001/XInclude">',
        "<Domain>",
        '<Grid Name="fields" GridType="Collection" CollectionType="Temporal">',
    ]
    for k, t in enumerate(times):
        lines.append(f'<Grid Name="fields_{k}" GridType="Uniform"><Time Value="{t:.10g}"/>')
        lines.append(f'<Topology TopologyType="3DCoRectMesh" Dimensions="{nz + 1} {ny + 1} {nx + 1}"/>')
        lines.append(
            '<Geometry GeometryType="ORIGIN_DXDYDZ">'
            f'<DataItem Dimensions="3" Format="XML">{z0:.10g} {y0:.10g} {x0:.10g}</DataItem>'
            f'<DataItem Dimensions="3" Format="XML">{dx:.10g} {dx:.10g} {dx:.10g}</DataItem></Geometry>'
        )
        for name in fields:
            lines.append(
                f'<Attribute Name="{name}" AttributeType="Scalar" Center="Cell">'
                + _slab(
                    h5_name,
                    f"/fields/{name}",
                    (n_snap, nz, ny, nx),
                    (k, 0, 0, 0),
                    (1, nz, ny, nx),
                    np.float32,
                    (nz, ny, nx),
                )
                + "</Attribute>"
            )
        if has_labels:
            lines.append(
                '<Attribute Name="tissue" AttributeType="Scalar" Center="Cell">'
                f'<DataItem Dimensions="{nz} {ny} {nx}" NumberType="UChar" Precision="1" Format="HDF">'
                f"{h5_name}:/tissue/labels</DataItem></Attribute>"
            )
        lines.append("</Grid>")
    lines.append("</Grid>")
    lines.append('<Grid Name="cells" GridType="Collection" CollectionType="Temporal">')
    for k, t in enumerate(times):
        a, b = int(offsets[k]), int(offsets[k + 1])
        n = b - a
        lines.append(f'<Grid Name="cells_{k}" GridType="Uniform"><Time Value="{t:.10g}"/>')
        lines.append(f'<Topology TopologyType="Polyvertex" NumberOfElements="{n}" NodesPerElement="1"/>')
        if n == 0:
            # An empty point set: readers choke on zero-length hyperslabs, so give inline nothing.
            lines.append(
                '<Geometry GeometryType="XYZ"><DataItem Dimensions="0 3" Format="XML"></DataItem></Geometry>'
            )
        else:
            lines.append(
                '<Geometry GeometryType="XYZ">'
                + _slab(h5_name, "/agents/position", (total, 3), (a, 0), (n, 3), np.float32)
                + "</Geometry>"
            )
            for name, dt in agent_attrs.items():
                lines.append(
                    f'<Attribute Name="{name}" AttributeType="Scalar" Center="Node">'
                    + _slab(h5_name, f"/agents/{name}", (total,), (a,), (n,), dt)
                    + "</Attribute>"
                )
        lines.append("</Grid>")
    lines.append("</Grid>")
    lines.append("</Domain>")
    lines.append("</Xdmf>")
    path = Path(xdmf_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
