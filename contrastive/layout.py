"""Where the shipped parts that are not Python live: the Hydra configs and the SLURM batch template.

A checkout keeps them at its top level (`configs/`, `slurm/`), as the project's plan draws it; the
wheel carries them inside the package (`contrastive/configs`, `contrastive/slurm`: pyproject.toml's
package-dir). Both are found from here, whichever way the package was installed.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped(name: str) -> Path:
    """The directory `name`: inside the installed package (a wheel), else at the checkout's top level."""
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name


CONFIG_DIR = shipped("configs")
SLURM_DIR = shipped("slurm")
