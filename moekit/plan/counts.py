"""Number formatting shared by the planner's tables (the counts themselves live with the model:
moekit.model.transformer.count_model)."""

from __future__ import annotations


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3f}{unit}"
    return str(int(n))
