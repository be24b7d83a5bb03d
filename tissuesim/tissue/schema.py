"""Config schemas of the tissue generators (registered in Hydra's ConfigStore by tissuesim.config).

Every length is in um, every density in cells per mm^2 of a histological section (see
:class:`InfiltrateConfig` for how 3D grids convert it). Each ``validate`` method takes the config
(dataclass or DictConfig) and raises ValueError with one line: key, value, what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class Diffusion:
    """Multipliers (>= 0) of each field's free diffusion coefficient inside one compartment."""

    cxcl13: float = 1.0
    cxcl10: float = 1.0
    ifng: float = 1.0
    il6: float = 1.0
    autoantibody: float = 1.0
    damage: float = 1.0


@dataclass
class InfiltrateConfig:
    """Initial immune cells (disease state) and resident macrophages.

    Densities are cells per mm^2 of a histological section, as biopsy studies count them, over the
    whole section (muscle, lung, from_labels) or over the synovial membrane (joint: lining,
    sublining, vessels, aggregates; cartilage and fluid are not counted). A 2D grid is such a
    section: count = density * area. A 3D grid converts by Abercrombie's stereology,
    N_V = N_A / (section_thickness_um + cell_diameter_um), then count = N_V * volume.
    With disease=False only resident macrophages are placed.
    """

    b_cell_per_mm2: float = 30.0
    plasmablast_per_mm2: float = 5.0
    plasma_cell_per_mm2: float = 15.0
    macrophage_per_mm2: float = 200.0
    resident_macrophage_per_mm2: float = 40.0
    niche_fraction: float = 0.8  # share of B cells/plasmablasts placed in niches; plasma cells: all
    section_thickness_um: float = 5.0  # paraffin section thickness the densities refer to
    cell_diameter_um: float = 8.0  # lymphocyte/macrophage diameter (7-10 um; MODEL.md section 3)


def _get(cfg, key):
    # attribute access works on the dataclass and on an OmegaConf DictConfig alike
    return getattr(cfg, key)


def _positive(cfg, prefix: str, *keys: str) -> None:
    for k in keys:
        v = _get(cfg, k)
        if not v > 0:
            raise ValueError(f"{prefix}{k}={v}: must be > 0")


def _in_range(cfg, prefix: str, key: str, lo: float, hi: float) -> None:
    v = _get(cfg, key)
    if not lo <= v <= hi:
        raise ValueError(f"{prefix}{key}={v}: allowed {lo}..{hi}")


def _check_infiltrate(inf, prefix: str) -> None:
    for k in ("b_cell_per_mm2", "plasmablast_per_mm2", "plasma_cell_per_mm2", "macrophage_per_mm2"):
        if _get(inf, k) < 0:
            raise ValueError(f"{prefix}{k}={_get(inf, k)}: must be >= 0")
    if _get(inf, "resident_macrophage_per_mm2") < 0:
        raise ValueError(
            f"{prefix}resident_macrophage_per_mm2={_get(inf, 'resident_macrophage_per_mm2')}: must be >= 0"
        )
    _in_range(inf, prefix, "niche_fraction", 0.0, 1.0)
    _positive(inf, prefix, "cell_diameter_um")
    if _get(inf, "section_thickness_um") < 0:
        raise ValueError(f"{prefix}section_thickness_um={_get(inf, 'section_thickness_um')}: must be >= 0")


def _check_diffusion(d, prefix: str) -> None:
    for k in ("cxcl13", "cxcl10", "ifng", "il6", "autoantibody", "damage"):
        if _get(d, k) < 0:
            raise ValueError(f"{prefix}{k}={_get(d, k)}: must be >= 0")


@dataclass
class TissueConfig:
    name: str = MISSING  # generator name: muscle|lung|joint|from_labels
    disease: bool = True  # disease state (initial infiltrates, damage, autoantibody)


@dataclass
class MuscleConfig(TissueConfig):
    """Skeletal muscle. 3D: fibres are prisms along x, the cross-section is the y-z plane.
    2D (nz == 1): the x-y plane is a transverse section (what histology shows), fibre axis out of plane.
    """

    name: str = "muscle"
    fibre_diameter_um: float = 44.0  # mean, 39-49 um untrained adults (Ingjer 1979)
    # seed jitter / spacing of the fibre lattice, 0..0.9: spread of fibre sizes (modelling choice)
    fibre_jitter: float = 0.6
    endomysium_um: float = 1.0  # 0.2-1 um in health (MODEL.md); drawn at least 1 voxel, face-connected
    fibres_per_fascicle: float = 50.0  # mean, 20-80 fibres per fascicle (MODEL.md)
    perimysium_min_um: float = 10.0  # septum thickness range 10-50 um (MODEL.md)
    perimysium_max_um: float = 50.0
    capillary_to_fibre: float = 1.45  # C/F 1.1-1.8 (Ingjer 1979; Andersen)
    capillary_diameter_um: float = 6.0  # 5-8 um; >= 1 voxel
    perimysial_vessels_per_mm2: float = 8.0  # arterioles/venules in septa (modelling choice)
    perimysial_vessel_diameter_um: float = 40.0  # 20-100 um arterioles/venules (modelling choice)
    perivascular_cuff_um: float = 40.0  # niche: open voxels within this distance of a perimysial vessel
    fibre_diffusion: Diffusion = field(
        default_factory=lambda: Diffusion(0.05, 0.05, 0.05, 0.05, 0.0, 0.0)
    )  # inside myofibres: membranes exclude proteins, IgG entirely (modelling choice)
    damage_peak: float = 0.6  # perifascicular damage at the fascicle edge, rel (modelling choice)
    # e-folding depth of damage from the perimysium: 1-2 fibre layers (perifascicular atrophy)
    damage_depth_um: float = 60.0
    # initial interstitial/serum autoantibody: the untreated equilibrium of the patch (see muscle.yaml)
    autoantibody_interstitial: float = 0.65
    infiltrate: InfiltrateConfig = field(default_factory=InfiltrateConfig)

    def validate(self) -> None:
        p = "tissue."
        _positive(
            self, p, "fibre_diameter_um", "endomysium_um", "fibres_per_fascicle", "capillary_diameter_um"
        )
        _positive(self, p, "perimysium_min_um", "perimysial_vessel_diameter_um", "damage_depth_um")
        _in_range(self, p, "fibre_jitter", 0.0, 0.9)
        if _get(self, "perimysium_max_um") < _get(self, "perimysium_min_um"):
            raise ValueError(
                f"{p}perimysium_max_um={_get(self, 'perimysium_max_um')}: must be >= perimysium_min_um"
            )
        _in_range(self, p, "capillary_to_fibre", 0.0, 4.0)
        _in_range(self, p, "damage_peak", 0.0, 1.0)
        _check_diffusion(_get(self, "fibre_diffusion"), p + "fibre_diffusion.")
        _check_infiltrate(_get(self, "infiltrate"), p + "infiltrate.")


@dataclass
class LungConfig(TissueConfig):
    """Alveolar parenchyma with one bronchovascular bundle running along x (3D; a disk pair in 2D)."""

    name: str = "lung"
    alveolar_diameter_um: float = 200.0  # equivalent diameter of an air space (Weibel; Ochs 2004)
    alveolar_jitter: float = 0.6  # seed jitter / lattice spacing, 0..0.9 (modelling choice)
    septum_um: float = 8.0  # healthy alveolar septum 5-10 um (>= 1 voxel)
    septum_ild_um: float = 30.0  # interstitial lung disease 20-50 um, used when disease=true
    capillary_fraction: float = 0.4  # share of the septal mid-plane that is capillary (modelling choice)
    # correlation length of the capillary segments in the septa (modelling choice)
    capillary_patch_um: float = 20.0
    bundle: bool = True  # place a bronchovascular bundle
    airway_diameter_um: float = 250.0  # bronchiolar lumen (modelling choice)
    airway_wall_um: float = 30.0  # epithelium + smooth muscle (modelling choice)
    artery_diameter_um: float = 150.0  # pulmonary artery branch beside the airway (modelling choice)
    sheath_um: float = 40.0  # bronchovascular interstitium around airway and artery
    lymphoid_aggregate_diameter_um: float = 200.0  # iBALT in ILD, 100-300 um (modelling choice), disease only
    damage_peak: float = 0.4  # septal injury in ILD, rel (modelling choice)
    autoantibody_interstitial: float = 0.7  # untreated equilibrium of the patch (see lung.yaml)
    infiltrate: InfiltrateConfig = field(default_factory=InfiltrateConfig)

    def validate(self) -> None:
        p = "tissue."
        _positive(self, p, "alveolar_diameter_um", "septum_um", "septum_ild_um", "capillary_patch_um")
        _positive(self, p, "airway_diameter_um", "artery_diameter_um")
        _in_range(self, p, "alveolar_jitter", 0.0, 0.9)
        _in_range(self, p, "capillary_fraction", 0.0, 1.0)
        _in_range(self, p, "damage_peak", 0.0, 1.0)
        _check_infiltrate(_get(self, "infiltrate"), p + "infiltrate.")


@dataclass
class JointConfig(TissueConfig):
    """Layers along y: bone | cartilage | synovial fluid | synovial lining | sublining.
    Sublining vessels run along z (disks in a 2D x-y section)."""

    name: str = "joint"
    bone_um: float = 100.0  # subchondral bone kept at the far side (modelling choice)
    cartilage_um: float = 2500.0  # articular cartilage 2-3 mm (MODEL.md); cut to fit the grid
    fluid_um: float = 200.0  # synovial fluid film (modelling choice)
    lining_um: float = 30.0  # normal lining 20-40 um, 1-3 cell layers (MODEL.md)
    lining_ra_um: float = 150.0  # rheumatoid lining, 10-15 layers of ~10-15 um cells; used when disease=true
    sublining_min_um: float = 400.0  # sublining kept at least this thick (RA synovium is mm thick; modelling choice); it takes the spare extent
    villus_amplitude_um: float = 30.0  # undulation of the lining surface (villi; modelling choice)
    villus_wavelength_um: float = 200.0  # lateral scale of the undulation (modelling choice)
    sublining_vessels_per_mm2: float = 150.0  # section density of sublining vessels (modelling choice)
    vessel_diameter_um: float = 20.0  # sublining capillaries/venules 10-30 um (modelling choice)
    lymphoid_aggregates_per_mm2: float = 4.0  # in the RA sublining section (modelling choice), disease only
    lymphoid_aggregate_diameter_um: float = 150.0  # 100-500 um (modelling choice)
    perivascular_cuff_um: float = 30.0  # niche: sublining within this distance of a vessel (modelling choice)
    cartilage_diffusion: Diffusion = field(
        default_factory=lambda: Diffusion(0.2, 0.2, 0.1, 0.1, 0.02, 0.0)
    )  # dense matrix hinders proteins, IgG most (modelling choice after Maroudas' partition data)
    bone_diffusion: Diffusion = field(default_factory=lambda: Diffusion(0.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    damage_peak: float = 0.5  # cartilage surface / lining damage in RA, rel (modelling choice)
    damage_depth_um: float = 50.0  # e-folding depth into the cartilage from its surface (modelling choice)
    autoantibody_interstitial: float = 0.3  # untreated equilibrium of the patch (see joint.yaml)
    infiltrate: InfiltrateConfig = field(default_factory=InfiltrateConfig)

    def validate(self) -> None:
        p = "tissue."
        _positive(self, p, "lining_um", "lining_ra_um", "vessel_diameter_um", "villus_wavelength_um")
        _positive(self, p, "lymphoid_aggregate_diameter_um", "damage_depth_um")
        for k in ("bone_um", "cartilage_um", "fluid_um", "sublining_min_um", "villus_amplitude_um"):
            if _get(self, k) < 0:
                raise ValueError(f"{p}{k}={_get(self, k)}: must be >= 0")
        _in_range(self, p, "damage_peak", 0.0, 1.0)
        _check_diffusion(_get(self, "cartilage_diffusion"), p + "cartilage_diffusion.")
        _check_diffusion(_get(self, "bone_diffusion"), p + "bone_diffusion.")
        _check_infiltrate(_get(self, "infiltrate"), p + "infiltrate.")


@dataclass
class FromLabelsConfig(TissueConfig):
    """A label volume on disk plus a YAML map label value -> compartment properties."""

    name: str = "from_labels"
    path: str = MISSING  # .npy, .h5/.hdf5 (with dataset) or .tif/.tiff stack; shape (nz, ny, nx) or (ny, nx)
    dataset: str | None = None  # HDF5 dataset path inside the file
    # YAML: {label value: {name, open_to_cells, vessel, diffusion, default_diffusion, niche}}
    map: str = MISSING
    niche_distance_um: float = 30.0  # open voxels this close to a vessel count as perivascular niche
    damage_initial: float = 0.0  # initial damage in closed, non-vessel voxels when disease=true (rel)
    autoantibody_interstitial: float = 0.4  # initial autoantibody in open voxels when disease=true
    infiltrate: InfiltrateConfig = field(default_factory=InfiltrateConfig)

    def validate(self) -> None:
        p = "tissue."
        _in_range(self, p, "damage_initial", 0.0, 1.0)
        if _get(self, "niche_distance_um") < 0:
            raise ValueError(f"{p}niche_distance_um={_get(self, 'niche_distance_um')}: must be >= 0")
        _check_infiltrate(_get(self, "infiltrate"), p + "infiltrate.")


TISSUE_SCHEMAS: dict[str, type] = {
    "muscle": MuscleConfig,
    "lung": LungConfig,
    "joint": JointConfig,
    "from_labels": FromLabelsConfig,
}
