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
    binder_immunogenicity : this product's binder, 0..1; null: the therapy's value (a second
        product with a fully human binder escapes the response raised against the first).
    """

    product: str = MISSING
    day: float = 0.0
    dose_per_kg: float = 1.0e6
    allogeneic: bool = False
    trigger: str = "day"
    binder_immunogenicity: float | None = None


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
    immunogenicity: float | None = None


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
        immunogenicity=None if inf.binder_immunogenicity is None else float(inf.binder_immunogenicity),
    )


class TherapySchedule:
    """What is still to be given: the dated events and the relapse-triggered infusions.

    therapy : TherapyConfig. ``pending`` holds Events sorted by day; ``relapse_infusions`` the
    InfusionConfigs with trigger='relapse' not given yet. The caller keeps the event log.
    """

    def __init__(self, therapy):
        self.therapy = therapy
        self.pending: list[Event] = scheduled_events(therapy)
        self.relapse_infusions = [inf for inf in therapy.infusions if inf.trigger == "relapse"]

    def due(self, t_end_day: float) -> list[Event]:
        """Pop the events whose day falls before ``t_end_day`` (the end of the current step):
        an event inside a step happens at its start (day-0 events before the first step)."""
        out = []
        while self.pending and self.pending[0].day < t_end_day - 1e-12:
            out.append(self.pending.pop(0))
        return out

    def on_relapse(self, day: float, relapse: bool, log: list[Event]) -> list[Event]:
        """Relapse-triggered infusions due now (relapse detected and their day reached).

        ``log`` is the event log so far: after a restart from a checkpoint the infusions it
        already holds are not given again."""
        if not self.relapse_infusions or not relapse:
            return []
        given = {e.what for e in log if e.detail.endswith("(relapse detected)")}
        self.relapse_infusions = [i for i in self.relapse_infusions if f"infuse_{i.product}" not in given]
        out = []
        for inf in [i for i in self.relapse_infusions if day >= i.day - 1e-12]:
            self.relapse_infusions.remove(inf)
            out.append(infusion_event(inf, day, " (relapse detected)"))
        return out

    def apply(self, ev: Event, blood) -> None:
        """Apply a therapy event to the blood compartment (biology.blood.Blood)."""
        if ev.what == "lymphodepletion":
            blood.lymphodeplete()
        elif ev.what.startswith("infuse_"):
            if ev.product is None:
                # an event restored from a checkpoint keeps (day, what, detail): find its infusion
                product = ev.what[len("infuse_") :]
                inf = next(
                    (
                        i
                        for i in self.therapy.infusions
                        if i.product == product and (i.trigger == "relapse" or abs(i.day - ev.day) < 1e-9)
                    ),
                    None,
                )
                if inf is None:
                    raise ValueError(f"event {ev.what} on day {ev.day}: no such infusion in therapy")
                ev = infusion_event(inf, ev.day)
            blood.infuse(ev.product, ev.dose_per_kg, ev.allogeneic, ev.immunogenicity)
