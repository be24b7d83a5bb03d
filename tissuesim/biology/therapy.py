"""Therapy schedules: what is given when.

A therapy is a list of infusions (CAR-T products or the antibody rituximab) at set days, plus
options (lymphodepletion, binder immunogenicity, CRS management). The schedule turns them into
dated events that the simulation applies at the step that reaches their day and writes to the
event log (/events in the HDF5 file, ``events`` in summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

PRODUCTS = ("cd19_car_t", "bcma_car_t", "rituximab")
CRS_MANAGEMENT = ("none", "tocilizumab", "steroids", "tocilizumab_steroids")
SECOND_DOSE_TRIGGERS = ("day", "relapse")


@dataclass
class InfusionConfig:
    """One infusion.

    product : one of PRODUCTS.
    day : simulated day of the infusion (day 0 is the start of the run).
    dose_per_kg : CAR-T cells per kg body weight (1e6/kg in Mackensen 2022), or mg/kg for rituximab.
    allogeneic : donor cells (rejected faster by the host).
    trigger : 'day' gives the infusion at ``day``; 'relapse' gives it when relapse is detected,
        but not before ``day``.
    """

    product: str = MISSING
    day: float = 0.0
    dose_per_kg: float = 1.0e6
    allogeneic: bool = False
    trigger: str = "day"


@dataclass
class TherapyConfig:
    """Schema of the Hydra group ``therapy``.

    binder_immunogenicity : 0 (fully human binder, no anti-CAR response) .. 1 (strongly
        immunogenic murine binder, as in the seed patient); a modelling choice scaling how fast
        anti-CAR immunity rises after exposure.
    lymphodepletion_day : fludarabine/cyclophosphamide before infusion (days, usually negative
        relative to the first infusion; ignored when lymphodepletion is false).
    """

    name: str = MISSING
    infusions: list[InfusionConfig] = field(default_factory=list)
    lymphodepletion: bool = True
    lymphodepletion_day: float = -3.0
    binder_immunogenicity: float = 0.3
    crs_management: str = "tocilizumab"


@dataclass(frozen=True)
class Event:
    """A dated therapy event. day in days; what: a short tag; detail: free text.

    product, dose_per_kg, allogeneic : the infusion an ``infuse_<product>`` event gives (None
    for other events); the simulation applies them to the blood compartment.
    """

    day: float
    what: str
    detail: str = ""
    product: str | None = None
    dose_per_kg: float = 0.0
    allogeneic: bool = False


def scheduled_events(therapy) -> list[Event]:
    """Events known in advance (trigger='day'), sorted by day.

    Infusions triggered by relapse are added by the simulation when relapse is detected.
    """
    events: list[Event] = []
    fixed = [inf for inf in therapy.infusions if inf.trigger == "day"]
    if therapy.lymphodepletion and therapy.infusions:
        first = min(inf.day for inf in therapy.infusions)
        events.append(
            Event(first + therapy.lymphodepletion_day, "lymphodepletion", "fludarabine/cyclophosphamide")
        )
    for inf in fixed:
        events.append(infusion_event(inf, float(inf.day)))
    return sorted(events, key=lambda e: (e.day, e.what))


def infusion_event(inf, day: float, note: str = "") -> Event:
    """The event of giving infusion ``inf`` (InfusionConfig) on ``day``."""
    kind = "allogeneic " if inf.allogeneic else ""
    return Event(
        day,
        f"infuse_{inf.product}",
        f"{kind}{inf.dose_per_kg:g} per kg{note}",
        product=str(inf.product),
        dose_per_kg=float(inf.dose_per_kg),
        allogeneic=bool(inf.allogeneic),
    )
