"""Cell types, interaction rules, the blood compartment and therapies."""
