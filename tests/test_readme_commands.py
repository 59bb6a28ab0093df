"""The README's two commands are the ones CI and the tests exercise (they cannot drift apart)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    ci_command = ci_command.split(" || status=")[0]
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert commands[1] == ci_command


def test_readme_main_command_sets_up_and_runs_on_shipped_data():
    main = readme_commands()[0]
    assert main.startswith("python3 -m venv .venv && .venv/bin/pip install")
    assert "-c constraints.txt" in main
    assert re.search(r"vemamba_iso_\w+ ", main), main
