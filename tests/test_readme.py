"""The README is for users (issue 41, item 3): short, no prose line too long to read, few ± figures, one picture, a
"Which recipe for my data" section that gives the two-stage recipe as one command, and every command it shows
composes (the Hydra entry points' configs with its overrides, the others' ``--help``)."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.helpers.processes import run_in_session

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# the entry points a README command may start: a Hydra one's config, or a script whose --help shows it parses
HYDRA_CONFIGS = {
    "train.py": "train",
    "evaluate.py": "eval",
    "psdclip.tools.audit": "audit",
    "psdclip.tools.export": "export",
}
HELP_SCRIPTS = ("psdclip.tools.report", "psdclip.data.make_shards", "bench.train_throughput")


def prose_lines() -> list[str]:
    """The README's lines outside code blocks and tables."""
    lines, in_code = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and not line.startswith("|"):
            lines.append(line)
    return lines


def commands() -> list[str]:
    """Every ``python …`` command in the README's code blocks, its comment removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    found = []
    for block in blocks:
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command.startswith("python ") or " python " in command:
                found.append(command[command.index("python ") :])
    return found


def test_the_readme_keeps_to_its_limits():
    assert len(README.splitlines()) <= 250
    assert all(len(line) <= 160 for line in prose_lines()), [line for line in prose_lines() if len(line) > 160]
    assert README.count("±") <= 12
    assert len(re.findall(r"!\[[^\]]*\]\([^)]+\.png\)", README)) == 1
    picture = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", README)[1]
    assert (ROOT / picture).is_file()


def test_the_readme_says_which_recipe_to_use_and_gives_the_recipe_as_one_command():
    section = README.split("## Which recipe for my data")[1].split("\n## ")[0]
    assert "python train.py recipe=audit_retrain" in section
    for loss in ("clip", "psd", "psd_memory"):
        assert f"`{loss}`" in section


def test_every_link_to_a_file_in_the_repository_exists():
    for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target


@pytest.mark.parametrize("command", commands())
def test_every_readme_command_composes(command):
    args = shlex.split(command.replace("<time>_<id>", "x").replace("<this repository>", "x"))[1:]
    entry = args[1] if args[0] == "-m" else args[0]
    rest = [arg for arg in args[2 if args[0] == "-m" else 1 :] if arg != "-m"]
    if entry in HELP_SCRIPTS:
        done = run_in_session([sys.executable, "-m", entry, "--help"], timeout=120)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}"
        return
    assert entry in HYDRA_CONFIGS, f"a README command the test does not know how to check: {command}"
    # a sweep's first job: each swept list's first value
    overrides = [re.sub(r"=([^\[\]'\"{},]+),[^\[\]'\"{}]*$", r"=\1", arg) for arg in rest]
    cfg = compose_config(overrides, name=HYDRA_CONFIGS[entry])
    assert cfg  # composing raised nothing: every group option and key it names exists
