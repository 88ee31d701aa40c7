"""Recipes: named settings for known geometries, matched automatically and overridable by flags.

A recipe is a TOML file with ``name``, ``description``, a ``[match]`` table (``architectures`` and
any config geometry keys, all of which must equal the source's) and a ``[settings]`` table
(``kv_lora_rank``, ``qk_rope_head_dim``, ``freqfold``, ...). Built-in recipes ship as the data
package ``transgqla.recipes`` (the repository's ``recipes/`` folder).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import InputError
from .source_geometry import SourceGeometry

SETTING_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "freqfold", "balance_kv", "method", "refine")
MATCH_KEYS = ("architectures", "hidden_size", "num_key_value_heads", "num_attention_heads", "head_dim", "num_hidden_layers")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    match: dict[str, Any]
    settings: dict[str, Any]
    origin: str

    def matches(self, geo: SourceGeometry) -> bool:
        values = {
            "hidden_size": geo.hidden,
            "num_key_value_heads": geo.n_groups,
            "num_attention_heads": geo.n_heads,
            "head_dim": geo.head_dim,
            "num_hidden_layers": geo.n_layers,
        }
        for key, want in self.match.items():
            if key == "architectures":
                if geo.architecture not in want:
                    return False
            elif values[key] != want:
                return False
        return True


def parse_recipe(text: str, origin: str) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"recipe {origin} is not valid TOML: {exc}") from None
    unknown = set(data) - {"name", "description", "match", "settings"}
    unknown |= {f"match.{k}" for k in data.get("match", {}) if k not in MATCH_KEYS}
    unknown |= {f"settings.{k}" for k in data.get("settings", {}) if k not in SETTING_KEYS}
    if unknown:
        raise InputError(f"recipe {origin} has unknown keys: {', '.join(sorted(unknown))}")
    if "name" not in data or "settings" not in data:
        raise InputError(f"recipe {origin} needs 'name' and a [settings] table")
    return Recipe(data["name"], data.get("description", ""), data.get("match", {}), data["settings"], origin)


def builtin_recipes() -> list[Recipe]:
    """All recipes shipped with the package, sorted by name."""
    folder = resources.files("transgqla.recipes")
    found = [parse_recipe(f.read_text(encoding="utf-8"), f.name) for f in folder.iterdir() if f.name.endswith(".toml")]
    return sorted(found, key=lambda r: r.name)


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise InputError(f"recipe file {path} does not exist")
        return parse_recipe(path.read_text(encoding="utf-8"), str(path))
    for recipe in builtin_recipes():
        if recipe.name == name_or_path:
            return recipe
    names = ", ".join(r.name for r in builtin_recipes())
    raise InputError(f"no recipe named '{name_or_path}'; built-in recipes are {names}")


def match_recipe(geo: SourceGeometry) -> Recipe | None:
    """The first built-in recipe whose match table fits the source, if any."""
    return next((r for r in builtin_recipes() if r.matches(geo)), None)
