"""`contrastive-submit`: submit `contrastive-train` as a SLURM job.

    contrastive-submit experiment=demo launcher.gpus_per_node=8 launcher.partition=gpu   # 8 tasks, one per GPU
    contrastive-submit launcher=slurm_multinode launcher.nodes=4 experiment=demo hydra.run.dir=runs/big
    contrastive-submit --dry-run experiment=demo         # print the batch script, submit nothing

Takes the same overrides as contrastive-train (launcher=slurm unless another launcher is named),
composes the configuration now, and writes into the run directory the composed config
(`job_config.yaml`, which the job trains from, so later edits of configs/ do not change it) and the
rendered batch script (`job.sbatch`). The job runs one task per rank through srun, checkpoints and
requeues itself on SIGUSR1 ahead of its time limit, and resumes from `latest` in the same run
directory after a requeue or a preemption.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf, open_dict


def compose(overrides: list[str]):
    """The training config these overrides compose (launcher=slurm unless another is named), checked
    as contrastive-train checks it, and the run directory."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from contrastive.cli.train import import_from_overrides
    from contrastive.config import CONFIG_DIR, refuse_credentials, validate

    import_from_overrides(overrides)
    if not any(o.startswith("launcher=") for o in overrides):
        overrides = ["launcher=slurm", *overrides]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    run_dir = Path(str(cfg.hydra.run.dir)).resolve()
    refuse_credentials(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    return cfg, run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contrastive-submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for contrastive-train")
    args = parser.parse_args(argv)

    from contrastive.launch import render_sbatch, resolve_allocation
    from contrastive.modalities import ConfigError

    try:
        cfg, run_dir = compose(args.overrides)
    except ConfigError as e:
        print(f"contrastive-submit: {e}", file=sys.stderr)
        return 2
    script = run_dir / "job.sbatch"
    launcher = OmegaConf.to_object(cfg.launcher)
    try:
        allocation = resolve_allocation(launcher, num_workers=cfg.data.num_workers)
    except ConfigError as e:
        print(f"contrastive-submit: {e}", file=sys.stderr)
        return 2
    text = render_sbatch(launcher, allocation, run_dir=run_dir, script=script, python=sys.executable)
    if args.dry_run:
        print(text)
        print(f"# (dry run: nothing written, nothing submitted; run directory would be {run_dir})", file=sys.stderr)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    # unresolved: an ${oc.env:...} credential is read where the job runs, never written here
    OmegaConf.save(cfg, run_dir / "job_config.yaml", resolve=False)
    script.write_text(text)
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"contrastive-submit: sbatch failed: {out.stderr.strip()}", file=sys.stderr)
        return out.returncode
    job = out.stdout.strip().split(";")[0]
    print(f"submitted job {job}")
    print(f"log: {run_dir / f'slurm-{job}.out'}")
    print(f"run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
