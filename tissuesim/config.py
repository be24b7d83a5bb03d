"""Configuration schema (dataclasses in Hydra's ConfigStore) and semantic validation.

Hydra and OmegaConf check types and unknown keys against the dataclasses below; :func:`validate`
checks what types cannot say (signs, allowed values, a dt the chosen field solver cannot take).
Every problem is reported as a :class:`ConfigError` whose message is one line naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from tissuesim.biology.therapy import CRS_MANAGEMENT, PRODUCTS, SECOND_DOSE_TRIGGERS, TherapyConfig
from tissuesim.fields.solvers import substeps_needed
from tissuesim.tissue.base import FIELD_NAMES
from tissuesim.tissue.schema import TISSUE_SCHEMAS, TissueConfig

BACKEND_NAMES = ("auto", "numpy", "cupy")
DTYPES = ("float32", "float64")
SOLVERS = ("auto", "explicit", "lod")
COMPRESSIONS = ("none", "gzip")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line: key, value, what is allowed."""


@dataclass
class GridConfig:
    """Voxel grid. nz == 1 is 2D. dx_um: voxel edge in um."""

    name: str = MISSING
    nx: int = 64
    ny: int = 64
    nz: int = 1
    dx_um: float = 10.0


@dataclass
class BackendConfig:
    """Array backend: auto (CuPy if a GPU answers, else NumPy), numpy or cupy; field precision."""

    name: str = "auto"
    dtype: str = "float32"


@dataclass
class FieldConfig:
    """One reaction-diffusion field (MODEL.md section 2).

    diffusion_um2_per_min : free diffusion coefficient D in um^2/min, scaled per compartment.
    decay_per_min : first-order loss k in 1/min (ln 2 / half-life).
    vessel_permeability_um_per_min : P of the Robin exchange with blood at vessel voxels, um/min.
    solver : auto | explicit | lod.
    max_substeps : most explicit substeps per step before the explicit solver refuses.
    diffuses_as : the field whose compartment multipliers of D this one takes (the tissues give
        them for the six fields of MODEL.md section 2; a new molecule names the one it moves like,
        e.g. an antibody moves like the IgG autoantibody). null: its own name.
    with_product : the field exists only in runs whose therapy infuses this product (an antibody
        drug's field costs nothing in the runs that do not give it). null: always.
    uptake_by : cell types that take the field up through their receptors (fields in nM only).
    uptake_molecules_per_cell_per_s : one such cell's uptake at saturation (molecules/s); below
        saturation it is this x u / (u + uptake_kd_nM), so a cell in a voxel removes the field
        there at the first-order rate rate_nM_per_min / (uptake_kd_nM + u) (1/min).
    uptake_kd_nM : the field level (nM) of half-maximal uptake (receptor half-occupancy).
    """

    units: str = "nM"
    long_name: str = ""
    diffusion_um2_per_min: float = 0.0
    decay_per_min: float = 0.0
    vessel_permeability_um_per_min: float = 0.0
    solver: str = "auto"
    max_substeps: int = 64
    diffuses_as: str | None = None
    with_product: str | None = None
    uptake_by: list[str] = field(default_factory=list)
    uptake_molecules_per_cell_per_s: float = 0.0
    uptake_kd_nM: float = 1.0


@dataclass
class CellTypeConfig:
    """Motility of one cell type (MODEL.md section 3); rules of the biology join later.

    speed_um_per_min : RMS crawling speed (0: sessile).
    persistence_min : persistence time of the velocity (Ornstein-Uhlenbeck), minutes.
    chemotaxis_field : field whose gradient the cells climb, or null.
    chemotactic_sensitivity_um2_per_min : chi in v = chi K/(K+c)^2 grad c (per field unit).
    receptor_kd : K, receptor saturation, in the field's units.
    radius_um : cell radius for crowding (overlapping cells are pushed apart).
    crowding_stiffness_per_min : overlap relaxation rate.
    """

    speed_um_per_min: float = 0.0
    persistence_min: float = 3.0
    chemotaxis_field: str | None = None
    chemotactic_sensitivity_um2_per_min: float = 0.0
    receptor_kd: float = 1.0
    max_drift_fraction: float = 1.0
    radius_um: float = 4.0
    crowding_stiffness_per_min: float = 1.0


@dataclass
class OutputConfig:
    """What is written when. Intervals in simulated days."""

    snapshot_every_days: float = 1.0
    timeseries_every_days: float = 0.25
    checkpoint_every_days: float = 0.0
    compression: str = "gzip"
    compression_level: int = 1
    progress: bool = True
    async_snapshots: bool = True


@dataclass
class CarProductConfig:
    """A CAR-T product: the antigen its binder recognises (a new target is a config entry)."""

    target: str = MISSING


@dataclass
class BloodConfig:
    """Systemic compartment (MODEL.md section 4); see conf/config.yaml for units and sources."""

    blood_volume_l: float = 5.0
    body_weight_kg: float = 70.0
    infusion_circulating_fraction: float = 0.25
    car_t_doubling_days: float = 0.78
    effector_half_life_days: float = 4.3
    memory_fraction: float = 0.008
    memory_half_life_days: float = 220.0
    antigen_kd_per_ul: float = 10.0
    exhaustion_days: float = 7.0
    kill_per_car_t_per_ul_per_day: float = 0.05
    b_cell_per_ul: float = 200.0
    autoreactive_b_cell_per_ul: float = 10.0
    b_cell_lifespan_days: float = 42.0
    autoreactive_b_cell_growth_per_day: float = 0.18
    extinction_per_ul: float = 2.0e-7
    autoreactive_niche_access: float = 0.6
    rituximab_niche_access: float = 0.1
    disease_drive_hill: float = 2.0
    disease_drive_half_rel: float = 0.6
    plasmablast_per_ul: float = 2.0
    plasmablast_lifespan_days: float = 4.0
    plasma_cell_per_ul: float = 50.0
    plasma_cell_lifespan_days: float = 730.0
    long_lived_antibody_fraction: float = 0.3
    igg_half_life_days: float = 21.0
    il6_baseline_pg_per_ml: float = 3.0
    il6_half_life_hours: float = 1.0
    il6_pg_per_ml_per_killed_cell_per_ul: float = 43.0
    crs_il6_thresholds_pg_per_ml: list[float] = field(default_factory=lambda: [20.0, 100.0, 500.0, 2000.0])
    tocilizumab_blockade: float = 0.9
    tocilizumab_half_life_days: float = 13.0
    steroid_il6_reduction: float = 0.5
    anti_car_growth_per_day: float = 0.3
    anti_car_seed: float = 1.0e-3
    allogeneic_factor: float = 5.0
    anti_car_kill_per_day: float = 1.0
    lymphodepletion_b_cell_fraction: float = 0.8
    lymphodepletion_t_cell_fraction: float = 0.9
    rituximab_plasma_volume_l: float = 3.0
    rituximab_half_life_days: float = 20.0
    rituximab_kill_per_day: float = 2.0
    rituximab_ec50_ug_per_ml: float = 10.0
    relapse_b_cell_fraction: float = 0.5
    relapse_autoantibody_rise: float = 0.2


@dataclass
class BiologyConfig:
    """Immunology rules (MODEL.md sections 3-4): antigens, CAR products, tissue rates, blood.

    Keys carry their unit (``_per_day`` 1/d, ``_min`` minutes, ``_um`` um, ...); conf/config.yaml
    gives each default's source or marks it a modelling choice.
    """

    antigens: dict[str, list[str]] = field(default_factory=dict)
    car_products: dict[str, CarProductConfig] = field(default_factory=dict)
    contact_radius_um: float = 10.0
    kill_probability_per_contact: float = 0.2
    handling_time_min: float = 25.0
    exhaustion_kills: float = 20.0
    anti_car_kill_probability_per_contact: float = 0.2
    car_t_doubling_days: float = 0.78
    stimulation_window_min: float = 1440.0
    ifng_molecules_per_cell_per_s: float = 10.0
    macrophage_activation_per_day: float = 2.0
    macrophage_ifng_kd_nM: float = 0.1
    macrophage_damage_activation_per_day: float = 0.05
    macrophage_deactivation_per_day: float = 1.0
    il6_pg_per_cell_per_hour: float = 1.0e-3
    b_cell_activation_per_day: float = 0.5
    b_cell_division_per_day: float = 0.0046
    activated_b_cell_division_per_day: float = 0.0266
    plasmablast_differentiation_per_day: float = 0.05
    plasma_cell_differentiation_per_day: float = 0.02
    igg_molecules_per_cell_per_s: float = 2000.0
    tissue_igg_autoantibody_fraction: float = 0.05
    autoantibody_baseline_nM: float = 1000.0
    cxcl13_nM_per_min_per_damage: float = 0.01
    cxcl10_nM_per_min: float = 0.05
    cxcl10_nM_per_min_per_damage: float = 0.01
    cxcl10_ifng_kd_nM: float = 0.1
    damage_per_day_per_macrophage: float = 0.02
    antibody_damage: bool = True
    lifespan_days: dict[str, float] = field(default_factory=dict)
    extravasation_per_ul_per_vessel_voxel_per_min: dict[str, float] = field(default_factory=dict)
    intravasation_per_min: dict[str, float] = field(default_factory=dict)
    inflammation_gain: float = 2.0
    inflammation_il6_kd_pg_per_ml: float = 50.0
    inflamed_volume_ml: float = 10.0
    monocyte_per_ul: float = 400.0
    anti_car_t_max_per_ul: float = 20.0
    rituximab_tissue_kill_per_day: float = 0.2
    blood: BloodConfig = field(default_factory=BloodConfig)


@dataclass
class Config:
    """The whole run. Top-level keys are the contract of DESIGN.md section 4."""

    tissue: TissueConfig = MISSING
    therapy: TherapyConfig = MISSING
    grid: GridConfig = MISSING
    backend: BackendConfig = MISSING
    seed: int | None = None
    duration_days: float = 30.0
    dt_min: float = 1.0
    device: int | None = None
    resume: str | None = None
    output: OutputConfig = field(default_factory=OutputConfig)
    fields: dict[str, FieldConfig] = field(default_factory=dict)
    cells: dict[str, CellTypeConfig] = field(default_factory=dict)
    biology: BiologyConfig = field(default_factory=BiologyConfig)


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="grid", name="schema_grid", node=GridConfig)
    cs.store(group="backend", name="schema_backend", node=BackendConfig)
    cs.store(group="therapy", name="schema_therapy", node=TherapyConfig)
    for name, cls in TISSUE_SCHEMAS.items():
        cs.store(group="tissue", name=f"schema_{name}", node=cls)


register_configs()


def conf_dir() -> Path:
    """Folder of the YAML configs: inside the package for a wheel, the repository's conf/ otherwise."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"conf/config.yaml not found next to {here}")


def group_options(group: str) -> list[str]:
    """Names selectable for a config group (YAML files in conf/<group>/)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


# ---------------------------------------------------------------------------------------------
# semantic validation


def takes_up(f) -> bool:
    """Whether cells take field config ``f`` up (uptake_by names types, at a rate above 0)."""
    return bool(f.uptake_by) and f.uptake_molecules_per_cell_per_s > 0


def active_fields(cfg) -> list[str]:
    """The names of the fields a run of ``cfg`` has, in config order: every entry of
    ``cfg.fields`` except those whose ``with_product`` no infusion of the therapy gives."""
    given = {inf.product for inf in cfg.therapy.infusions}
    return [n for n, f in cfg.fields.items() if f.with_product is None or f.with_product in given]


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={_show(value)}: {allowed}")


def _show(v: Any) -> str:
    if v is None:
        return "null"  # as the YAML and the override say it
    if v == "???":
        return v
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, float) and v.is_integer():
        return repr(v)
    return str(v)


# Keys whose name ends in these units are lengths, times or rates and must not be negative.
_NONNEGATIVE_SUFFIXES = (
    "_um",
    "_mm",
    "_days",
    "_day",
    "_min",
    "_hours",
    "_per_min",
    "_per_day",
    "_per_hour",
    "_per_s",
    "_um2_per_min",
    "_um_per_min",
    "_per_kg",
    "_per_mm2",
    "_per_mm3",
    "_per_ul",
    "_fraction",
)


# Keys whose name ends in these are shares of a whole: 0..1, except the caps listed after.
_SHARE_SUFFIXES = ("_fraction", "_blockade", "_niche_access", "_penetration")
# max_drift_fraction caps drift speed as a multiple of cell speed; relapse_b_cell_fraction is a
# B-cell return threshold as a multiple of baseline
_SHARES_ABOVE_ONE = ("max_drift_fraction", "relapse_b_cell_fraction")


def _walk(node: Any, prefix: str):
    if isinstance(node, DictConfig | dict):
        for k in node.keys():
            v = node[k]
            key = f"{prefix}.{k}" if prefix else str(k)
            yield from _walk(v, key)
    elif isinstance(node, ListConfig | list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, node


def _check_known_keys(node: DictConfig, prefix: str) -> None:
    """Reject keys added with '+' that the node's schema does not have (typos like +sed=3)."""
    cls = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        for k in node:
            if k not in known:
                where = f"'{prefix[:-1]}'" if prefix else "the top level"
                _fail(f"{prefix}{k}", node[k], f"unknown key in {where}; allowed: {', '.join(sorted(known))}")
    for k in node:
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _check_known_keys(child, f"{prefix}{k}.")


def validate(cfg: DictConfig | Config) -> None:
    """Check what the schema's types cannot; raise ConfigError (one line) on the first problem."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)

    if cfg.seed is not None and not 0 <= cfg.seed < 2**63:
        _fail("seed", cfg.seed, "must be an integer in [0, 2^63)")
    if not cfg.duration_days > 0:
        _fail("duration_days", cfg.duration_days, "must be > 0 days")
    if not cfg.dt_min > 0:
        _fail("dt_min", cfg.dt_min, "must be > 0 minutes")
    if cfg.device is not None and cfg.device < 0:
        _fail("device", cfg.device, "must be a GPU index >= 0 (or null to let tissuesim choose)")

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        _fail(missing[0], "???", f"required, no default; set it on the command line ({missing[0]}=...)")
    _check_known_keys(cfg, "")

    g = cfg.grid
    for k in ("nx", "ny", "nz"):
        if g[k] < 1:
            _fail(f"grid.{k}", g[k], "must be >= 1 voxels")
    if not g.dx_um > 0:
        _fail("grid.dx_um", g.dx_um, "must be > 0 um")

    if cfg.backend.name not in BACKEND_NAMES:
        _fail("backend.name", cfg.backend.name, f"allowed: {', '.join(BACKEND_NAMES)}")
    if cfg.backend.dtype not in DTYPES:
        _fail("backend.dtype", cfg.backend.dtype, f"allowed: {', '.join(DTYPES)}")

    o = cfg.output
    day_min = 1440.0
    for k in ("snapshot_every_days", "timeseries_every_days"):
        if not o[k] > 0:
            _fail(f"output.{k}", o[k], "must be > 0 days")
        if o[k] * day_min < cfg.dt_min * (1 - 1e-9):
            _fail(
                f"output.{k}",
                o[k],
                f"must be >= one step (dt_min={cfg.dt_min} min = {cfg.dt_min / day_min:.6g} days)",
            )
    if o.compression not in COMPRESSIONS:
        _fail("output.compression", o.compression, f"allowed: {', '.join(COMPRESSIONS)}")
    if not 0 <= o.compression_level <= 9:
        _fail("output.compression_level", o.compression_level, "allowed: 0..9")

    ndim = 2 if g.nz == 1 else 3
    present = active_fields(cfg)
    for name, f in cfg.fields.items():
        like = name if f.diffuses_as is None else f.diffuses_as
        if like not in FIELD_NAMES:
            _fail(
                f"fields.{name}.diffuses_as",
                f.diffuses_as,
                f"allowed: {', '.join(FIELD_NAMES)} (the tissues give D multipliers for these; a field "
                f"named {name!r} must name the one it moves like)",
            )
        if f.uptake_by:
            from tissuesim.simulation import CELL_TYPES

            for t in f.uptake_by:
                if t not in CELL_TYPES:
                    _fail(f"fields.{name}.uptake_by", t, f"allowed: cell types {', '.join(CELL_TYPES)}")
            if f.units != "nM":
                _fail(f"fields.{name}.units", f.units, "uptake (uptake_by) needs a field in nM")
        if not f.uptake_kd_nM > 0:
            _fail(f"fields.{name}.uptake_kd_nM", f.uptake_kd_nM, "must be > 0 nM")
        if f.with_product is not None and f.with_product not in PRODUCTS:
            _fail(f"fields.{name}.with_product", f.with_product, f"allowed: null, {', '.join(PRODUCTS)}")
    uptaking = [n for n in present if takes_up(cfg.fields[n])]
    if len(uptaking) > 8:
        _fail(
            "fields", ",".join(uptaking), "allowed: at most 8 fields with uptake (one bit each per cell type)"
        )
    if any(inf.product == "rituximab" for inf in cfg.therapy.infusions) and "rituximab" not in present:
        # rituximab acts in the tissue through the field of that name (its level at each cell)
        _fail(
            "therapy.infusions",
            "rituximab",
            "allowed when the run has a field named rituximab (its tissue level; conf/config.yaml "
            "fields.rituximab)",
        )

    for name, f in cfg.fields.items():
        if f.solver not in SOLVERS:
            _fail(f"fields.{name}.solver", f.solver, f"allowed: {', '.join(SOLVERS)}")
        if f.max_substeps < 1:
            _fail(f"fields.{name}.max_substeps", f.max_substeps, "must be >= 1")
        # the explicit step's limit matters only for the fields this run has
        if f.solver == "explicit" and f.diffusion_um2_per_min > 0 and name in present:
            # Reactions are integrated exactly, so only diffusion limits the explicit step; the
            # tissue's compartment multipliers are checked again when the FieldSet is built.
            n = substeps_needed(cfg.dt_min, f.diffusion_um2_per_min, g.dx_um, ndim)
            if n > f.max_substeps:
                limit = cfg.dt_min / n * f.max_substeps
                _fail(
                    "dt_min",
                    cfg.dt_min,
                    f"fields.{name}.solver=explicit needs {n} substeps but max_substeps={f.max_substeps}; "
                    f"allowed: dt_min <= {limit:.4g} min, or fields.{name}.solver=lod|auto",
                )

    for name, c in cfg.cells.items():
        if c.chemotaxis_field is not None and c.chemotaxis_field not in present:
            _fail(
                f"cells.{name}.chemotaxis_field",
                c.chemotaxis_field,
                f"allowed: null, {', '.join(present)} (the fields of this run)",
            )
        if not c.persistence_min > 0:
            _fail(f"cells.{name}.persistence_min", c.persistence_min, "must be > 0 minutes")
        if not c.receptor_kd > 0:
            _fail(f"cells.{name}.receptor_kd", c.receptor_kd, "must be > 0")
        # A step may move a cell at most ~one voxel (the wall test looks one voxel ahead).
        if c.speed_um_per_min * cfg.dt_min > g.dx_um:
            _fail(
                "dt_min",
                cfg.dt_min,
                f"cells.{name} at {c.speed_um_per_min} um/min would cross more than one {g.dx_um} um voxel per step; "
                f"allowed: dt_min <= {g.dx_um / c.speed_um_per_min:.4g} min",
            )

    t = cfg.therapy
    if t.crs_management not in CRS_MANAGEMENT:
        _fail("therapy.crs_management", t.crs_management, f"allowed: {', '.join(CRS_MANAGEMENT)}")
    if not 0 <= t.binder_immunogenicity <= 1:
        _fail(
            "therapy.binder_immunogenicity", t.binder_immunogenicity, "allowed: 0 (fully human) .. 1 (murine)"
        )
    for i, inf in enumerate(t.infusions):
        if inf.binder_immunogenicity is not None and not 0 <= inf.binder_immunogenicity <= 1:
            _fail(
                f"therapy.infusions[{i}].binder_immunogenicity",
                inf.binder_immunogenicity,
                "allowed: 0..1 or null",
            )
        if inf.product not in PRODUCTS:
            _fail(f"therapy.infusions[{i}].product", inf.product, f"allowed: {', '.join(PRODUCTS)}")
        if inf.trigger not in SECOND_DOSE_TRIGGERS:
            _fail(
                f"therapy.infusions[{i}].trigger", inf.trigger, f"allowed: {', '.join(SECOND_DOSE_TRIGGERS)}"
            )

    # Lengths, times, rates and doses: never negative, wherever they sit.
    for key, value in _walk(cfg, ""):
        leaf = key.rsplit(".", 1)[-1].split("[")[0]
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                _fail(key, value, "must be a finite number")
            if leaf.endswith(_NONNEGATIVE_SUFFIXES) and value < 0 and leaf != "lymphodepletion_day":
                _fail(key, value, "must be >= 0 (a length, time, rate or dose cannot be negative)")
            # shares of a whole (above 1, e.g. a lymphodepletion would leave a negative count)
            if leaf.endswith(_SHARE_SUFFIXES) and leaf not in _SHARES_ABOVE_ONE and not 0 <= value <= 1:
                _fail(key, value, "allowed: 0..1 (a share of a whole)")

    bio = cfg.biology
    for k in ("kill_probability_per_contact", "anti_car_kill_probability_per_contact"):
        if not 0 <= bio[k] <= 1:
            _fail(f"biology.{k}", bio[k], "allowed: 0..1 (a probability per contact)")
    if not bio.exhaustion_kills > 0:
        _fail("biology.exhaustion_kills", bio.exhaustion_kills, "must be > 0 kills")
    for p in bio.car_products:
        if p not in ("cd19_car_t", "bcma_car_t"):
            _fail(f"biology.car_products.{p}", p, "allowed: a CAR-T cell type (cd19_car_t, bcma_car_t)")
    for i, inf in enumerate(t.infusions):
        if inf.product != "rituximab" and inf.product not in bio.car_products:
            _fail(
                f"therapy.infusions[{i}].product",
                inf.product,
                f"no biology.car_products entry; known: {', '.join(bio.car_products)}",
            )
    bl = bio.blood
    if not bl.disease_drive_hill >= 1:
        _fail("biology.blood.disease_drive_hill", bl.disease_drive_hill, "must be >= 1 (Hill exponent)")
    if not 0 < bl.disease_drive_half_rel < 1:
        _fail("biology.blood.disease_drive_half_rel", bl.disease_drive_half_rel, "allowed: 0 < K < 1 (rel)")
    for k in ("autoreactive_b_cell_per_ul", "plasmablast_per_ul", "plasma_cell_per_ul"):
        if not bl[k] > 0:
            _fail(f"biology.blood.{k}", bl[k], "must be > 0 (the baseline each state is scaled by)")
    if not bl.b_cell_per_ul > bl.autoreactive_b_cell_per_ul:
        _fail("biology.blood.b_cell_per_ul", bl.b_cell_per_ul, "must exceed autoreactive_b_cell_per_ul")
    if not bl.rituximab_ec50_ug_per_ml > 0:
        _fail("biology.blood.rituximab_ec50_ug_per_ml", bl.rituximab_ec50_ug_per_ml, "must be > 0 ug/mL")
    th = list(bio.blood.crs_il6_thresholds_pg_per_ml)
    if len(th) != 4 or th != sorted(th):
        _fail("biology.blood.crs_il6_thresholds_pg_per_ml", th, "four ascending pg/mL values (grades 1..4)")

    if cfg.tissue.name not in TISSUE_SCHEMAS:
        _fail("tissue.name", cfg.tissue.name, f"allowed: {', '.join(sorted(TISSUE_SCHEMAS))}")
    check = getattr(OmegaConf.get_type(cfg.tissue), "validate", None)
    if callable(check):
        try:
            check(cfg.tissue)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
