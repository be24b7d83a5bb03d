"""Clinical readouts, sweep reports, figures."""
