"""`hfserve service install | uninstall | status`: the systemd unit, checked by systemd itself."""

from __future__ import annotations

import getpass
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import hfserve_cmd

START_ARGS = ["--workers", "4", "--port", "8123", "--drain-timeout-s", "45", "--log-level", "INFO"]


def run_service(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*hfserve_cmd(), "service", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def settings(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


@pytest.mark.parametrize("scope", [[], ["--system"]], ids=["user", "system"])
def test_dry_run_unit_passes_systemd_analyze_verify(tmp_path: Path, scope: list[str]) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; .ci/run installs it)")
    env = {"HFSERVE_API_KEY": "sk-never-in-the-unit", "HFSERVE_CACHE": str(tmp_path / "cache")}
    proc = run_service("install", *scope, "--dry-run", "--", *START_ARGS, env=env)
    assert proc.returncode == 0, proc.stderr
    unit = proc.stdout
    path = tmp_path / "hfserve.service"
    path.write_text(unit)
    verify_env = dict(os.environ)
    if not scope:
        # A user manager's verify needs a runtime folder, which a session without a login lacks.
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        verify_env.setdefault("XDG_RUNTIME_DIR", str(runtime))
    mode = ["--system"] if scope else ["--user"]
    check = subprocess.run(
        [analyze, *mode, "verify", str(path)], capture_output=True, text=True, timeout=60, env=verify_env
    )
    assert check.returncode == 0 and check.stderr.strip() == "", check.stderr
    assert "sk-never-in-the-unit" not in unit
    s = settings(unit)
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"] and s["KillMode"] == ["mixed"]
    assert int(s["WatchdogSec"][0]) > 0
    assert int(s["TimeoutStopSec"][0]) > 45  # longer than the drain it waits for
    assert s["EnvironmentFile"] == ["-%E/hfserve/hfserve.env"]
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes")]:
        assert s[key] == [value]
    assert "PrivateDevices" not in s and "MemoryDenyWriteExecute" not in s  # they break a GPU
    assert "ProtectKernelModules" not in s
    # A configuration error exits 78 under the unit, and is not restarted.
    assert s["RestartPreventExitStatus"] == ["78"] and "HFSERVE_CONFIG_ERROR_EXIT=78" in s["Environment"]
    writable = s["ReadWritePaths"][0].split()
    assert f"-{tmp_path / 'cache'}" in writable
    account = os.environ.get("SUDO_USER") or getpass.getuser()  # whom a system unit runs as
    home = Path(pwd.getpwnam(account).pw_dir) if scope else Path.home()
    assert {f"-{home / '.nv'}", f"-{home / '.triton'}"} <= set(writable)  # CUDA's and Triton's caches
    # ExecStart: this interpreter's `hfserve start` with the options given after `--`, and it runs.
    argv = shlex.split(s["ExecStart"][0])
    assert argv == [sys.executable, "-P", "-m", "cli.main", "start", *START_ARGS]
    helped = subprocess.run([*argv[:5], "--help"], cwd="/", capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--drain-timeout-s" in helped.stdout, helped.stderr
    assert s["WantedBy"] == (["multi-user.target"] if scope else ["default.target"])


def test_relative_paths_in_the_start_options_become_absolute(tmp_path: Path) -> None:
    (tmp_path / "my-model").mkdir()
    proc = subprocess.run(
        [*hfserve_cmd(), "service", "install", "--dry-run", "--", "--model", "my-model", "--port", "9000"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    argv = shlex.split(settings(proc.stdout)["ExecStart"][0])
    assert argv[5:] == ["--model", str(tmp_path / "my-model"), "--port", "9000"]


def test_responses_db_folder_and_xdg_cache_home_are_writable(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("HFSERVE_CACHE", "HF_HOME", "HF_HUB_CACHE")}
    proc = subprocess.run(
        [*hfserve_cmd(), "service", "install", "--dry-run", "--", "--responses-db", "db/r.sqlite3"],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    s = settings(proc.stdout)
    # The database that does not exist yet is a path all the same, made absolute.
    assert shlex.split(s["ExecStart"][0])[5:] == ["--responses-db", str(tmp_path / "db" / "r.sqlite3")]
    writable = s["ReadWritePaths"][0].split()
    for folder in (tmp_path / "db", tmp_path / "xdg" / "hfserve", tmp_path / "xdg" / "huggingface"):
        assert f"-{folder}" in writable, writable
    assert f"XDG_CACHE_HOME={tmp_path / 'xdg'}" in s["Environment"]  # the service looks where install did


def test_api_key_on_the_command_line_is_refused() -> None:
    proc = run_service("install", "--dry-run", "--", "--api-key", "sk-secret")
    assert proc.returncode == 1
    assert "HFSERVE_API_KEY" in proc.stderr and "sk-secret" not in proc.stdout + proc.stderr


def test_install_uninstall_status_user_unit(tmp_path: Path) -> None:
    # A fake systemctl that records its calls: the test must not touch this machine's systemd.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "fake status"\n')
    fake.chmod(0o755)
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    proc = run_service("install", "--now", "--", "--workers", "2", env=env)
    assert proc.returncode == 0, proc.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "hfserve.service"
    env_file = tmp_path / "config" / "hfserve" / "hfserve.env"
    assert "Type=notify" in unit.read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it will hold secrets
    assert calls.read_text().splitlines() == ["--user daemon-reload", "--user enable --now hfserve"]
    assert "journalctl --user -u hfserve" in proc.stdout
    env_file.write_text("HFSERVE_API_KEY=sk-kept\n")

    proc = run_service("install", "--", "--workers", "3", env=env)  # again: the secrets stay
    assert proc.returncode == 0 and "--workers 3" in unit.read_text()
    assert env_file.read_text() == "HFSERVE_API_KEY=sk-kept\n"

    proc = run_service("status", env=env)
    assert proc.returncode == 0 and "fake status" in proc.stdout
    assert calls.read_text().splitlines()[-1] == "--user status --no-pager hfserve"

    proc = run_service("uninstall", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not unit.exists() and env_file.exists()
    assert "--user disable --now hfserve" in calls.read_text()
    proc = run_service("uninstall", env=env)
    assert proc.returncode == 1 and "no unit" in proc.stderr
