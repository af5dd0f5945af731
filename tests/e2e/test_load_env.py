"""``load_env.sh`` in real bash: values exactly as written, nothing executed, comments and
quotes handled, world-readable files with secrets refused, both ways of using it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from runtime.config import env_example

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "load_env.sh"
BASH = shutil.which("bash") or "/bin/bash"

# Prints the listed variables as JSON after sourcing (python reads them from its environment).
DUMP = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"


def source(
    tmp: Path, text: str, names: list[str], mode: int = 0o600
) -> tuple[int, dict[str, str | None], str]:
    """Write ``text`` as ``.env`` (``mode``), ``source load_env.sh`` it in bash, return
    (exit code, the variables, stderr)."""
    env_file = tmp / ".env"
    env_file.write_text(text)
    env_file.chmod(mode)
    script = (
        f'source "{SCRIPT}" "{env_file}"; rc=$?; python3 -c "$DUMP" {" ".join(names)}; exit $rc'
    )
    proc = subprocess.run(
        [BASH, "-c", script],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": os.environ["PATH"], "DUMP": DUMP, "HOME": str(tmp)},
    )
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def test_values_are_taken_literally(tmp_path: Path) -> None:
    text = (
        "# a comment\n"
        "\n"
        "PLAIN=simple value   # trailing comment\n"
        "export EXPORTED=yes\n"
        "SINGLE='$(touch single) `touch tick` $HOME # kept'\n"
        'DOUBLE="say \\"hi\\" \\$HOME $(touch double) tab\\there"  # c\n'
        "HASH=a#b\n"
        "EMPTY=\n"
        'JSON={"fast": 10, "slow": 30}\n'
        "  SPACED = around  \n"
        "CRLF=windows\r\n"
        "LAST=no newline at end"
    )
    names = [
        "PLAIN",
        "EXPORTED",
        "SINGLE",
        "DOUBLE",
        "HASH",
        "EMPTY",
        "JSON",
        "SPACED",
        "CRLF",
        "LAST",
    ]
    rc, got, err = source(tmp_path, text, names)
    assert rc == 0, err
    assert got == {
        "PLAIN": "simple value",
        "EXPORTED": "yes",
        "SINGLE": "$(touch single) `touch tick` $HOME # kept",
        "DOUBLE": 'say "hi" $HOME $(touch double) tab\there',
        "HASH": "a#b",
        "EMPTY": "",
        "JSON": '{"fast": 10, "slow": 30}',
        "SPACED": "around",
        "CRLF": "windows",
        "LAST": "no newline at end",
    }
    # nothing in the file was executed
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("single", "tick", "double")]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("NOT A LINE", "expected KEY=value"),
        ("1BAD=x", "not a valid variable name"),
        ("BAD-NAME=x", "not a valid variable name"),
        ("Q='open", "unterminated single quote"),
        ('Q="open', "unterminated double quote"),
        ("Q='a' trailing", "unexpected text"),
        ("$(touch pwned)=x", "not a valid variable name"),
    ],
)
def test_bad_lines_are_refused_with_the_line_number(tmp_path: Path, line: str, needle: str) -> None:
    rc, got, err = source(tmp_path, f"GOOD=1\n{line}\n", ["GOOD"])
    assert rc == 1
    assert needle in err and "line 2" in err
    assert got["GOOD"] is None  # all or nothing
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "line",
    ["ALPACA_SECRET_KEY: sk9XyZsecretPART/abc+def=", "vErYsEcReTbase64+/Zz=="],
)
def test_a_line_that_is_not_key_value_is_never_shown(tmp_path: Path, line: str) -> None:
    """helper-82: a YAML line or a wrapped base64 line has a value before its first '=': the
    error printed it as the 'key'."""
    rc, _, err = source(tmp_path, f"GOOD=1\n{line}\n", ["GOOD"])
    assert rc == 1 and "line 2" in err and "not a valid variable name" in err
    assert "secret" not in err.lower() and "sk9" not in err and "base64" not in err


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_group_or_world_readable_file_with_secrets_is_refused(tmp_path: Path, mode: int) -> None:
    secret = "sk-should-not-print-0123456789"
    text = f"MODE=paper\nALPACA_SECRET_KEY={secret}\n"
    rc, got, err = source(tmp_path, text, ["MODE", "ALPACA_SECRET_KEY"], mode=mode)
    assert rc == 1 and "chmod 600" in err
    assert got == {"MODE": None, "ALPACA_SECRET_KEY": None}
    assert secret not in err
    rc, got, _ = source(tmp_path, text, ["MODE", "ALPACA_SECRET_KEY"], mode=0o600)
    assert rc == 0 and got["ALPACA_SECRET_KEY"] == secret


@pytest.mark.parametrize(
    "text",
    [
        "MODE=paper\nSYMBOLS=AAPL\n",  # no secret at all
        "ALPACA_API_KEY=\n",  # declared but empty
        "ALPACA_API_KEY_SECRET=alpaca-key\n",  # a Secret Manager name, not a secret
    ],
)
def test_world_readable_file_without_secrets_is_fine(tmp_path: Path, text: str) -> None:
    rc, _, err = source(tmp_path, text, ["MODE"], mode=0o644)
    assert rc == 0, err


def test_sourcing_does_not_leak_helpers_or_exit_the_shell(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("BAD LINE\n")
    env_file.chmod(0o600)
    script = (
        f'source "{SCRIPT}" "{env_file}"; echo "rc=$?"; '
        "declare -F _load_env_main >/dev/null && echo leaked; echo alive"
    )
    proc = subprocess.run(
        [BASH, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.stdout.split() == ["rc=1", "alive"]


def test_run_a_command_with_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "run.env"
    env_file.write_text("GREETING='hello world'\n")
    env_file.chmod(0o600)
    proc = subprocess.run(
        [
            BASH,
            str(SCRIPT),
            str(env_file),
            "--",
            "python3",
            "-c",
            "import os; print(os.environ['GREETING'])",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == "hello world\n"
    usage = subprocess.run(
        [BASH, str(SCRIPT), str(env_file)], capture_output=True, text=True, timeout=30, check=False
    )
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_env_example_loads(tmp_path: Path) -> None:
    # Uncommenting every line of .env.example gives a file load_env.sh accepts.
    text = "\n".join(
        line[1:] if line.startswith("#") and "=" in line.split()[0] else line
        for line in env_example().splitlines()
    )
    rc, got, err = source(tmp_path, text, ["MODE", "AGENT_PARAMS", "FMEL_SINK"])
    assert rc == 0, err
    assert got == {"MODE": "backtest", "AGENT_PARAMS": "{}", "FMEL_SINK": "local"}


def test_odd_files_are_refused_or_followed(tmp_path: Path) -> None:
    """helper-84: a symlinked .env was refused as mode 777 whatever its target's mode; a file
    with CR line endings loaded as one line (a secret inside another value, no permission
    check); NUL bytes were dropped without a word."""
    secret = "sk-should-not-print-0123456789"
    target = tmp_path / "real.env"
    target.write_text(f"MODE=paper\nALPACA_SECRET_KEY={secret}\n")
    target.chmod(0o600)
    link = tmp_path / "link.env"
    link.symlink_to(target)
    done = subprocess.run(
        ["bash", str(ROOT / "load_env.sh"), str(link), "--", "printenv", "MODE"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stdout.strip() == "paper", done.stderr
    for name, data in (
        ("cr.env", f"MODE=paper\rALPACA_SECRET_KEY={secret}\r".encode()),
        ("nul.env", f"MODE=pa\0per\nALPACA_SECRET_KEY={secret}\n".encode()),
    ):
        f = tmp_path / name
        f.write_bytes(data)
        f.chmod(0o600)
        done = subprocess.run(
            ["bash", str(ROOT / "load_env.sh"), str(f), "--", "printenv", "MODE"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 1, (name, done.stdout)
        assert secret not in done.stderr and (
            "carriage return" in done.stderr or "NUL" in done.stderr
        )
