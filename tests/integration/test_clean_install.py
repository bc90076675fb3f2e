"""`pip install .` without extras into a clean venv: every command's help, --version, and each
usage mistake answered with one line and exit 2 (issue 11).

This tests the dependency declaration itself: the venv gets only what pyproject.toml declares
(resolved by pip as a user's fresh install would), so a module the CLI imports but does not
declare (click, once typer stopped depending on it) fails here. About 20 s with a package index
at hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

COMMANDS = ["daemon", "submit", "status", "show", "gpus", "logs", "cancel", "retry", "hold",
            "release", "drain", "resume", "plot", "extract", "doctor", "demo"]  # fmt: skip

#: Usage mistakes from issue 11: each must exit 2 with one line on stderr.
MISTAKES = [
    [],
    ["--no-such-option"],
    ["no-such-command"],
    ["status", "--no-such-option"],
    ["show"],
    ["submit", "--priority", "abc"],
    ["status", "--watch", "-n", "0.05"],
    ["submit", "--min-free-gib", "lots"],
    ["cancel"],
    ["logs", "--follow"],
]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install <copy of this repo>`, no extras."""
    root = tmp_path_factory.mktemp("clean")
    src = root / "src-copy"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", "bench", "build"
        ),
    )
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    done = subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "--quiet", str(src)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return env_dir


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["GPUSPOOL_STATE_DIR"] = "/nonexistent-state"  # never the host's real queue
    return subprocess.run(
        [str(venv / "bin" / "gpuspool"), *args],
        capture_output=True, text=True, timeout=120, env=env, cwd=venv, check=False,
    )  # fmt: skip


HELP_SCRIPT = """
import contextlib, io, json, sys
from gpuspool.cli import main
out = {}
for args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    out[" ".join(args)] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def test_declared_dependencies_are_enough_for_every_help(venv: Path) -> None:
    """--help and -h of the tool and of every command work on a daemon-only install (one
    process for all of them, to keep the test quick; the mistakes below run one each)."""
    import json

    cases = [["--help"], ["-h"], *([c, "--help"] for c in COMMANDS), ["status", "-h"]]
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", HELP_SCRIPT, json.dumps(cases)],
        capture_output=True, text=True, timeout=300, cwd=venv, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    results = json.loads(done.stdout)
    for args in cases:
        code, text = results[" ".join(args)]
        assert code == 0 and "sage" in text, (args, code, text)


def test_version(venv: Path) -> None:
    done = _run(venv, "--version")
    assert done.returncode == 0 and done.stdout.strip() == "gpuspool 0.1.0", done


@pytest.mark.parametrize("args", MISTAKES, ids=lambda a: " ".join(a) or "(nothing)")
def test_usage_mistake_is_one_line_and_exit_2(venv: Path, args: list[str]) -> None:
    done = _run(venv, *args)
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "usage: gpuspool" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_extract_without_the_extra_says_which_extra(venv: Path) -> None:
    """The worker needs the extract extra; a daemon-only install says so in one line."""
    done = _run(venv, "extract", "-i", "a.jsonl", "-o", "b.jsonl", "--tokenizer", "x/y")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "gpuspool[extract]" in done.stderr and len(done.stderr.splitlines()) == 1


def test_shell_completion_completes_commands(venv: Path) -> None:
    """--show-completion prints a script; the completion protocol answers with commands."""
    script = _run(venv, "--show-completion", "bash")
    assert script.returncode == 0 and "_gpuspool_completion" in script.stdout
    env_args = {"_GPUSPOOL_COMPLETE": "complete_bash", "COMP_WORDS": "gpuspool sta",
                "COMP_CWORD": "1"}  # fmt: skip
    done = subprocess.run(
        [str(venv / "bin" / "gpuspool")],
        capture_output=True, text=True, timeout=60, env={**os.environ, **env_args}, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.split() == ["status"], done


MISTAKES_SCRIPT = """
import contextlib, io, json, sys
from gpuspool.cli import main
out = {}
for args in json.loads(sys.argv[1]):
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        code = main(args)
    out[" ".join(args)] = [code, so.getvalue(), se.getvalue()]
print(json.dumps(out))
"""


def test_lowest_pinned_typer_behaves_the_same(venv: Path) -> None:
    """The lower bound of the typer pin (0.27.2, the first that vendors click): every help
    and every usage mistake as above. Runs last: it downgrades typer in the module's venv."""
    import json

    done = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "typer==0.27.2"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cases = [["--help"], *([c, "--help"] for c in COMMANDS), ["--version"]]
    helps = subprocess.run(
        [str(venv / "bin" / "python"), "-c", MISTAKES_SCRIPT, json.dumps(cases)],
        capture_output=True, text=True, timeout=300, cwd=venv, check=False,
    )  # fmt: skip
    assert helps.returncode == 0, helps.stderr
    for args, (code, out, err) in json.loads(helps.stdout).items():
        assert code == 0 and out and not err, (args, code, err)
    mistakes = subprocess.run(
        [str(venv / "bin" / "python"), "-c", MISTAKES_SCRIPT, json.dumps(MISTAKES)],
        capture_output=True, text=True, timeout=300, cwd=venv, check=False,
    )  # fmt: skip
    assert mistakes.returncode == 0, mistakes.stderr
    for args, (code, out, err) in json.loads(mistakes.stdout).items():
        assert code == 2 and not out and len(err.splitlines()) == 1, (args, code, out, err)
        assert "usage: gpuspool" in err
