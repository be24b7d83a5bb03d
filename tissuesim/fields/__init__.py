"""Reaction-diffusion fields on the voxel grid (NumPy or CuPy kernels).

Equation, per field u (lengths um, times min)::

    du/dt = div(D(x) grad u) - k u - lambda(x) u + S(x) + vessel_rate(x) (c_b - u)

D(x) um^2/min (per voxel; face coefficients by the harmonic mean of the two voxels, conservative
flux form, no flux next to a D == 0 voxel), k 1/min (decay), lambda(x) 1/min (uptake by cells),
S(x) units/min (secretion), vessel_rate 1/min (permeability x wall area / voxel volume) and c_b
the blood concentration (units of u, a per-field scalar that may stay on the device).

Grid: cell-centred, arrays indexed [z, y, x] with shape (nz, ny, nx) (2D when nz == 1), voxel
edge dx in um. Boundaries per face (x-, x+, y-, y+, z-, z+): zero-flux (default), Dirichlet (the
value on the face, half a voxel from the centre) or periodic (tissuesim.fields.boundary).

Schemes (chosen per field, FieldSpec.solver)
--------------------------------------------
explicit
    Forward Euler, 5/7-point stencil, in the fewest equal substeps with
    h <= dx^2 / (W Dmax), W = 2 per axis swept, plus one for each axis with a Dirichlet face
    (an axis one voxel long: 2 per Dirichlet face, else nothing), so that no value turns
    negative (:func:`explicit_stable_dt`, solvers.stencil_weight); O(h) + O(dx^2). A configured
    max_substeps that would be exceeded is an error naming the field, dt and the limit.
lod
    Locally one-dimensional backward Euler (x, then y, then z sweep), one Thomas solve per grid
    line, cyclic (Sherman-Morrison) on periodic axes; unconditionally stable, O(dt) + O(dx^2).
    After BioFVM: Ghaffarizadeh, Friedman & Macklin (2016) Bioinformatics 32:1256, here with
    variable D(x) and all boundary kinds.
auto
    explicit when it needs <= 4 substeps, lod otherwise. Fields with D == 0 everywhere skip
    diffusion.

Reactions are linear per voxel and integrated exactly over the whole step (exponential
integrator: u <- u e^{-a dt} + b dt phi1(a dt), a = k + lambda + vessel_rate,
b = S + vessel_rate c_b), before diffusion: Lie (sequential) operator splitting, first order in
dt (e.g. Hundsdorfer & Verwer 2003, Numerical Solution of Time-Dependent Advection-Diffusion-
Reaction Equations, ch. IV). Diffusing last means the values after a step, which the cells read,
carry that step's secretion already spread: with the reverse order a secreting cell's voxel held
all of it (IFN-gamma there 40x the steady state at dt = 1 min). What remains near a point source
is the scheme's smoothing: the secreting voxel reads 0.76x / 0.86x the steady state of the same
discrete operator at dt = 1 / 0.25 min with LOD, and 50 um away within 4 %
(tests/fields/test_accuracy.py). A consequence to keep in mind: at steady state the splitting
acts like a loss rate a (1 - a dt / 2 + ...) instead of a, i.e. decay lengths sqrt(D/a) come out
~a dt/4 too long; keep a dt small (<< 1) where steady gradients matter.

Public API
----------
FieldSpec, FieldSet (stacked fields, step, budget), explicit_stable_dt, substeps_needed,
diffuse_explicit, diffuse_lod (plain arrays, one step). Kernel/twin pairs: tissuesim.fields.ops.
"""

from __future__ import annotations

from tissuesim.fields.boundary import FACES, normalize_bc
from tissuesim.fields.fieldset import BUDGET_TERMS, SOLVERS, FieldSet, FieldSpec
from tissuesim.fields.solvers import (
    AUTO_MAX_EXPLICIT_SUBSTEPS,
    diffuse_explicit,
    diffuse_lod,
    explicit_stable_dt,
    substeps_needed,
)

__all__ = [
    "AUTO_MAX_EXPLICIT_SUBSTEPS",
    "BUDGET_TERMS",
    "FACES",
    "SOLVERS",
    "FieldSet",
    "FieldSpec",
    "diffuse_explicit",
    "diffuse_lod",
    "explicit_stable_dt",
    "normalize_bc",
    "substeps_needed",
]
