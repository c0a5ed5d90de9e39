"""The help: plain flags and arguments, every option of quantize in the README, and no torch imported to show it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from fp8q.cli import app
from tests.support.runs import ROOT, _fp8q_run


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys; sys.argv = ['fp8q', '--help']\n"
        "from fp8q.__main__ import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip().endswith("False"), out.stderr


def test_help_shows_flags_and_arguments_plainly():
    run = _fp8q_run("quantize", "--help", env={"COLUMNS": "200"})
    assert "quantize [OPTIONS] SRC [OUT]" in run.stdout
    assert "<bool>" not in run.stdout and "{src}" not in run.stdout.lower()


def test_every_option_is_in_the_readme_and_scheme_help_names_mx():
    import re

    from typer.main import get_command

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = get_command(app).commands["quantize"]  # type: ignore[attr-defined]
    flags = {flag for param in command.params for flag in param.opts if flag.startswith("--") and flag != "--help"}
    missing = sorted(flag for flag in flags if not re.search(rf"`{re.escape(flag)}[` ]", readme))
    assert missing == [], missing
    assert "`--scheme channel|block|tensor|mx`" in readme.replace("\\|", "|")
    help_text = CliRunner().invoke(app, ["quantize", "--help"], env={"COLUMNS": "200"}).stdout
    assert "or MXFP8 (mx: per 32 inputs)" in " ".join(help_text.replace("│", " ").split())
