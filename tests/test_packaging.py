"""The package as a user installs it: a wheel built from the checkout, installed (not editable) into
a fresh virtual environment by the same install script, trains the demo from an unrelated directory
with the configs it carries and renders the SLURM template; a user's own config directory joins the
shipped ones through Hydra's search path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_jsonl, run_cli

USER_EXPERIMENT = """# @package _global_
# contrastive-train hydra.searchpath=[file://DIR] experiment=mine
defaults:
  - demo
trainer:
  max_steps: 3
  log_every: 1
eval:
  prompts: ["my digit {label}"]
"""


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A clean copy of the checkout (tracked and new files, nothing ignored), its wheel, and a fresh
    virtual environment with that wheel installed by scripts/install.sh."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(tmp / "dist")], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("contrastive-*.whl")
    venv = tmp / "venv"
    run(["bash", "scripts/install.sh"], cwd=src, env={**os.environ, "VENV": str(venv), "PACKAGE": str(wheel)})
    return venv


def test_the_wheel_trains_the_demo_from_an_unrelated_directory(wheel_venv, demo_data, tmp_path):
    where = run(
        [str(wheel_venv / "bin" / "python"), "-c", "import contrastive; print(contrastive.__file__)"], cwd=tmp_path
    ).stdout
    assert where.startswith(str(wheel_venv)) and "site-packages" in where  # not the checkout, not editable
    # the checkout's top-level configs/, data_tools/ and slurm/ travel inside the package
    found = run(
        [
            str(wheel_venv / "bin" / "python"),
            "-c",
            "from contrastive import layout; import contrastive.data_tools as d;"
            " print(layout.CONFIG_DIR, layout.SLURM_DIR, d.__file__)",
        ],
        cwd=tmp_path,
    ).stdout.split()
    package = Path(where.strip()).parent
    assert found == [str(package / "configs"), str(package / "slurm"), str(package / "data_tools" / "__init__.py")]
    assert (package / "configs" / "experiment" / "demo.yaml").is_file() and (
        package / "slurm" / "train.sbatch"
    ).is_file()
    assert (package / "search.html").is_file()  # the search service's page
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run(
        [
            str(wheel_venv / "bin" / "contrastive-train"),
            "experiment=demo",
            "trainer.max_steps=20",
            f"data.train={demo_data / 'train'}",
            f"data.eval={demo_data / 'heldout'}",
            "data.batch_size=16",
            "hydra.run.dir=run",
        ],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": ""},
    )
    rows = read_jsonl(elsewhere / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [20]
    assert "eval/zero_shot/image->text/acc" in rows[-1]
    assert (elsewhere / "run" / "export" / "model.safetensors").exists()

    script = run(
        [str(wheel_venv / "bin" / "contrastive-submit"), "--dry-run", "experiment=demo", "hydra.run.dir=job"],
        cwd=elsewhere,
    ).stdout
    assert "#SBATCH --requeue" in script and "-m contrastive.cli.train" in script
    assert str(wheel_venv / "bin" / "python") in script


def test_a_user_config_directory_joins_through_the_search_path(tmp_path):
    mine = tmp_path / "my_configs"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    searchpath = f"hydra.searchpath=[file://{mine}]"
    printed = run_cli("contrastive-train", searchpath, "experiment=mine", "--cfg", "job", cwd=tmp_path).stdout
    assert "max_steps: 3" in printed and "my digit {label}" in printed and "embed_dim: 64" in printed
    script = run_cli(
        "contrastive-submit",
        "--dry-run",
        searchpath,
        "experiment=mine",
        f"hydra.run.dir={tmp_path / 'job'}",
        cwd=tmp_path,
    ).stdout
    assert "#SBATCH --nodes=1" in script


def test_a_checkout_keeps_the_plans_layout():
    from contrastive import layout

    top = {p.name for p in REPO.iterdir() if not p.name.startswith(".")} - {
        "contrastive.egg-info",
        "runs",
        "data",
        "outputs",
    }
    assert top >= {"contrastive", "configs", "scripts", "data_tools", "tests", "slurm", "pyproject.toml", "README.md"}
    assert layout.CONFIG_DIR == REPO / "configs" and layout.SLURM_DIR == REPO / "slurm"  # an editable install
    assert (REPO / "slurm" / "train.sbatch").is_file() and (REPO / "slurm" / "local_cluster.sh").is_file()
