"""Accelerators the planner knows: dense bf16 rate, memory, bandwidth, interconnect, price.
Override or add entries with a TOML file: one table per GPU, the fields of `Hardware`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from moekit.config import read_toml
from moekit.errors import ConfigError


@dataclass(frozen=True)
class Hardware:
    name: str
    bf16_flops: float  # dense bf16 tensor-core FLOP/s (datasheet, no sparsity)
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    interconnect: float  # NVLink bytes/s per GPU (one direction x 2, as vendors quote)
    price_per_hour: float  # default $/GPU-hour (cloud list prices of the era; override in TOML)


HARDWARE: dict[str, Hardware] = {
    # $1.10 per A100-hour is the rental rate behind the reported $63M estimate
    "a100-40gb": Hardware("a100-40gb", 312e12, 40e9, 1.555e12, 600e9, 1.10),
    "a100-80gb": Hardware("a100-80gb", 312e12, 80e9, 2.039e12, 600e9, 1.50),
    "h100-sxm": Hardware("h100-sxm", 989e12, 80e9, 3.35e12, 900e9, 2.50),
    "h200": Hardware("h200", 989e12, 141e9, 4.8e12, 900e9, 3.50),
}


def load_hardware(path: str | Path | None = None) -> dict[str, Hardware]:
    table = dict(HARDWARE)
    if path is None:
        return table
    data = read_toml(path, "hardware")
    names = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
    for name, fields in data.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        unknown = set(fields) - names
        if unknown:
            raise ConfigError(f"{path}: [{name}] has unknown fields {sorted(unknown)}; known: {sorted(names)}")
        base = dataclasses.asdict(table[name]) if name in table else {}
        merged = {**base, **{k: float(v) for k, v in fields.items()}, "name": name}
        missing = names - set(merged)
        if missing:
            raise ConfigError(f"{path}: new GPU [{name}] needs {sorted(missing)}")
        table[name] = Hardware(**merged)
    return table


def get_hardware(name: str, path: str | Path | None = None) -> Hardware:
    table = load_hardware(path)
    if name not in table:
        raise ConfigError(f"unknown hardware {name!r}; choose one of: {', '.join(table)}")
    return table[name]
