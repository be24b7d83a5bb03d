"""Loading and launching the kernels of kernels/agents.cu (CuPy side only)."""

from __future__ import annotations

from tissuesim.backend import Backend, get_kernel

FILENAME = "agents.cu"
#: --fmad=false: no fused multiply-adds, so float arithmetic rounds as in the NumPy twins
#: (only transcendental functions then differ, by an ulp).
OPTIONS = ("--fmad=false",)
#: Every extern "C" kernel of agents.cu (the tests build and compare each one).
KERNEL_NAMES = (
    "bin_keys",
    "bin_ranges_fill",
    "voxel_index_fill",
    "count_pairs",
    "write_pairs",
    "crowd_displacement",
    "move_cells",
    "claim_init",
    "claim_choose",
    "claim_resolve",
    "claim_commit",
    "extravasate_fill",
    "philox_fill",
    "philox_uniform_fill",
    "init_velocity_fill",
    "cell_fates",
    "kill_pair_mask",
    "kill_commit",
    "fate_exits",
    "source_counts",
    "source_fields",
    "box_muller_fill",
)
BLOCK = 256

# Device flag bits (same values as the #defines in agents.cu).
FLAG_PAIR_OVERFLOW = 1
FLAG_DISPLACEMENT_CAPPED = 2
FLAG_IN_CLOSED_VOXEL = 4
FLAG_BAD_TYPE = 8

FLAG_NAMES = {
    FLAG_PAIR_OVERFLOW: "pair buffer overflow (contacts were dropped)",
    FLAG_DISPLACEMENT_CAPPED: "a step longer than 64 x 0.99 dx along an axis was capped (dt far too large)",
    FLAG_IN_CLOSED_VOXEL: "a cell sat inside a closed voxel",
    FLAG_BAD_TYPE: "a cell type without motility parameters",
}


def launch(be: Backend, name: str, n: int, args: tuple) -> None:
    """Launch kernel `name` with one thread per item (n items); no-op for n == 0."""
    if n <= 0:
        return
    k = get_kernel(be, FILENAME, name, options=OPTIONS)
    k(((int(n) + BLOCK - 1) // BLOCK,), (BLOCK,), args)
