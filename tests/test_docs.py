"""The README's CLI reference matches the parsers' --help, and every command the README's quick
start names exists."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_matches_help():
    result = subprocess.run([sys.executable, "-m", "jaguar.cli.reference", "--check"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_quick_start_scripts_exist_and_ci_uses_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash launch/demo.sh" in readme and "bash launch/test.sh" in readme
    assert (ROOT / "launch" / "demo.sh").is_file() and (ROOT / "launch" / "test.sh").is_file()
    assert "launch/test.sh" in (ROOT / ".ci" / "run").read_text()
