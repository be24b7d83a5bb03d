"""Named units. Inside the solver lengths are micrometres and times are minutes.

Multiply a number by a unit to express it in solver units, divide to read it back::

    dt = 30 * seconds          # -> 0.5 (minutes)
    t_days = t_min / days
"""

from __future__ import annotations

# length, in micrometres
um = 1.0
mm = 1000.0 * um
cm = 10.0 * mm

# time, in minutes
minutes = 1.0
seconds = minutes / 60.0
hours = 60.0 * minutes
days = 24.0 * hours

# volume
uL = mm**3  # one microlitre is one cubic millimetre, in um^3
mL = 1000.0 * uL
L = 1000.0 * mL
