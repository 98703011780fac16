"""A README that cannot drift: every `contrastive-*` command it shows (in its command blocks and its
inline examples) and every config override its tables show is split as a shell splits it and
checked the way a run starts, reading no data: contrastive-train's overrides composed by Hydra and
turned into the run's settings (unknown keys, credentials, every setting's type, the optimizer and
schedule instantiated, each modality, loss and tower built from its settings); contrastive-submit
rendered with --dry-run; the other tools' flags parsed by their own parsers."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, compose

README = (REPO / "README.md").read_text()
TOOLS = (
    "contrastive-train",
    "contrastive-submit",
    "contrastive-eval",
    "contrastive-data",
    "contrastive-embed",
    "contrastive-export",
)
# an override a table shows: a config key (optionally +), =, a value; quoted for the shell or not
OVERRIDE = re.compile(r"""^["']?\+?[a-z_]+(\.[A-Za-z0-9_\-]+)*=""")


def shell_blocks() -> list[tuple[int, list[str]]]:
    """(README line of its first line, its lines) of each ```bash block."""
    blocks, current, lines = [], None, README.splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            if current is None:
                current = (number + 1, []) if line.strip() in ("```bash", "```sh") else (number + 1, None)
            else:
                if current[1] is not None:
                    blocks.append(current)
                current = None
        elif current is not None and current[1] is not None:
            current[1].append(line)
    return blocks


def line_of(position: int) -> int:
    return README.count("\n", 0, position) + 1


def shell_words(text: str) -> list[str]:
    """What a shell hands the command: words split and unquoted, comments dropped, an escaped `\\$`
    a plain `$` (as bash leaves it inside double quotes, where shlex keeps the backslash)."""
    return [word.replace("\\$", "$") for word in shlex.split(text, comments=True)]


def command_examples() -> list[tuple[int, str, list[str]]]:
    """(README line, tool, its arguments) for each command line of the command blocks and each inline
    example that runs a contrastive-* tool (also behind torchrun/deepspeed/srun or an assignment)."""
    found = []
    for first, lines in shell_blocks():
        command, start = "", first
        for number, line in enumerate(lines, first):
            if not command:
                start = number
            command += line.rstrip()
            if command.endswith("\\"):  # a continuation line, as the shell joins them
                command = command[:-1] + " "
                continue
            found += _invocations(start, command)
            command = ""
    for span in re.finditer(r"`([^`\n]+)`", README):
        if any(span.group(1).lstrip().startswith(t) for t in TOOLS):
            found += [e for e in _invocations(line_of(span.start()), span.group(1)) if _runs_something(e[2])]
    return found


def _invocations(line: int, text: str) -> list[tuple[int, str, list[str]]]:
    if not any(t in text for t in TOOLS) or "<" in text or "..." in text:
        return []  # no command, or a shape with placeholders (`<export|checkpoint>`, `...`)
    words = shell_words(text)
    if words and words[-1] == "&":  # run in the background: the command is the same
        words = words[:-1]
    for i, word in enumerate(words):
        tool = next((t for t in TOOLS if word.endswith(t) or word == f"$(which {t})"), None)
        if tool is not None and (i == 0 or "=" not in word):
            return [(line, tool, words[i + 1 :])]
    return []


def _runs_something(args: list[str]) -> bool:
    """An inline example (not prose naming a tool, `contrastive-data benchmark`): a flag or an override."""
    return any(a.startswith("-") or "=" in a for a in args)


def override_examples() -> list[tuple[int, list[str]]]:
    """(README line, the overrides) of each inline example that is a config override, in the tables
    and in the prose alike."""
    found = []
    for span in re.finditer(r"`([^`\n]+)`", README):
        code = span.group(1)
        placeholder = re.search(r"=[A-Z]+$", code) or "..." in code or "<" in code  # `data.train_num_samples=N`
        if OVERRIDE.match(code) and not placeholder:
            found.append((line_of(span.start()), shell_words(code)))
    return found


def check_training_overrides(overrides: list[str], tmp_path: Path) -> None:
    """The overrides as contrastive-train starts with them, short of reading data or building towers."""
    from contrastive.builders import build_loss, build_modalities
    from contrastive.cli.train import run_spec
    from contrastive.engine import deepspeed_config
    from contrastive.evaluation import eval_sets
    from contrastive.towers import tower_settings

    imports = [o for o in overrides if o.startswith("imports=")]
    if imports:  # the user's own module (README: "Add a modality"): the overrides must still parse
        from hydra.core.override_parser.overrides_parser import OverridesParser

        OverridesParser.create().parse_overrides(overrides)
        return
    hydra_flags = {"--cfg", "job", "-m", "--multirun"}
    cfg = compose(*[o for o in overrides if o not in hydra_flags and not o.startswith("hydra.")])
    spec = run_spec(cfg)
    modalities = build_modalities(spec.modalities, spec.modality)
    build_loss(list(modalities), spec.loss)
    for name, fields in spec.model.towers.items():
        tower_settings(name, fields)
    engine = spec.engine
    if isinstance(engine.config, str) and not Path(engine.config).exists():  # the user's own JSON file
        engine = dataclasses.replace(engine, config=None)
    deepspeed_config(engine, micro_batch_size=spec.data.batch_size, world_size=1, precision=spec.trainer.precision)
    if not any("://" in str(s) for s in (spec.data.eval, *spec.eval.sets.values())):
        eval_sets(spec.eval, None if spec.data.eval is None else str(tmp_path))  # set settings, no network


EXAMPLES = command_examples()


def test_the_readme_shows_what_it_should():
    tools = {tool for _, tool, _ in EXAMPLES}
    assert tools >= {
        "contrastive-train",
        "contrastive-submit",
        "contrastive-eval",
        "contrastive-data",
        "contrastive-export",
    }
    assert len(EXAMPLES) >= 40 and len(override_examples()) >= 15


@pytest.mark.parametrize("line,tool,args", EXAMPLES, ids=[f"README:{line}" for line, _, _ in EXAMPLES])
def test_every_command_in_the_readme_starts(line, tool, args, tmp_path, capsys, monkeypatch):
    for name in re.findall(r"\$\{oc\.env:(\w+)\}", " ".join(args)):
        monkeypatch.setenv(name, "from-the-environment")  # as the README's `export NAME=...` sets it
    if tool == "contrastive-train":
        check_training_overrides(args, tmp_path)
    elif tool == "contrastive-submit":
        from contrastive.cli import submit

        dry = [a for a in args if a != "--dry-run"]
        assert submit.main(["--dry-run", *dry, f"hydra.run.dir={tmp_path / 'job'}"]) == 0, capsys.readouterr().err
        assert "#SBATCH" in capsys.readouterr().out
    else:
        module = {
            "contrastive-eval": "contrastive.cli.evaluate",
            "contrastive-data": "contrastive.data_tools.cli",
            "contrastive-embed": "contrastive.cli.embed",
            "contrastive-export": "contrastive.cli.export",
        }[tool]
        import importlib

        importlib.import_module(module).parser().parse_args(args)  # unknown flags and choices exit here


OVERRIDES = override_examples()


@pytest.mark.parametrize("line,overrides", OVERRIDES, ids=[f"README:{line}" for line, _ in OVERRIDES])
def test_every_override_in_the_readmes_tables_composes(line, overrides, tmp_path):
    check_training_overrides(["experiment=demo", *overrides], tmp_path)


RUN_MARK = "<!-- test_readme: run -->"


def runnable_blocks() -> list[tuple[int, str]]:
    """(README line, text) of each command block marked to be run as written."""
    lines = README.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() == RUN_MARK:
            assert lines[i + 1].strip() in ("```bash", "```sh"), f"README:{i + 1}: the mark precedes no command block"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            found.append((i + 3, "\n".join(lines[i + 2 : end])))
    return found


@pytest.fixture(scope="module")
def quickstart_layout(demo_data, tmp_path_factory):
    """A directory as the quickstart leaves it: data/demo (here the suite's small demo set, with its
    entries.txt and seven.png) and runs/demo (the latest run, its export inside)."""
    from conftest import run_cli, tiny_overrides

    root = tmp_path_factory.mktemp("readme-layout")
    (root / "data").mkdir()
    (root / "data" / "demo").symlink_to(demo_data)
    run_dir = root / "runs" / "demo-20261204-120000"
    run_cli("contrastive-train", *tiny_overrides(demo_data, run_dir), "trainer.max_steps=30", "data.batch_size=32")
    (root / "runs" / "demo").symlink_to(run_dir.name)
    return root


def test_the_readmes_curation_export_and_search_examples_run_as_written(quickstart_layout, tmp_path):
    """Every marked block, as written, in the directory the quickstart leaves (only the service's
    port changed, and each contrastive-* tool run as the suite runs it)."""
    import os
    import subprocess

    from ports import free_port

    from conftest import BIN, tool

    blocks = runnable_blocks()
    assert len(blocks) >= 3 and any("contrastive-data dedup" in b for _, b in blocks)
    port = str(free_port())
    tools = tmp_path / "bin"  # each tool as the suite runs it, under its own name (`cmd &` is its process)
    tools.mkdir()
    for name in ("contrastive-data", "contrastive-embed", "contrastive-export", "contrastive-eval"):
        (tools / name).write_text(f'#!/bin/sh\nexec {" ".join(tool(name))} "$@"\n')
        (tools / name).chmod(0o755)
    lines = ["set -euo pipefail", "trap 'kill ${SERVING:-} 2>/dev/null || true' EXIT"]
    for line, block in blocks:
        lines.append(f"echo '== README:{line}'")
        for command in block.replace("8000", port).splitlines():
            lines.append(command)
            if command.startswith("contrastive-embed serve"):  # ready before the queries, stopped at the end
                wait = f"for i in $(seq 120); do curl -sf 127.0.0.1:{port}/api/info >/dev/null && break; sleep 1; done"
                lines += ["SERVING=$!", wait]
    proc = subprocess.run(
        ["bash", "-c", "\n".join(lines)],
        cwd=quickstart_layout,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": f"{tools}:{BIN}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.count('"results"') == 2, proc.stdout[-2000:]  # both queries answered
    for made in ("data/demo-scores/score.json", "data/demo-top/curation.json", "data/demo-balanced/balance.png",
                 "data/demo-deduped/dedup.png", "data/demo-polluted/pollute.png", "runs/demo/hub/README.md",
                 "data/demo-idx/index.json"):  # fmt: skip
        assert (quickstart_layout / made).exists(), made
