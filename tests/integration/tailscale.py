"""Run an official tailscaled inside a topology host and drive it with the tailscale CLI.

Kernel TUN by default (each host is its own namespace, so routes and netfilter rules the daemon
installs stay inside it); `userspace=True` uses netstack instead.

Kernel mode and DNS: `up()` passes `--accept-dns=false` unless asked otherwise, because the
mount namespace is shared with the machine and a daemon managing DNS would edit /etc/resolv.conf.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.integration import versions
from tests.integration.netns import Host
from tests.integration.procs import NamespacedProcess

# The daemon's environment in every test: no log uploads, no update checks, nothing that
# reaches outside the namespaces.
BASE_ENV: dict[str, str] = {
    "TS_NO_LOGS_NO_SUPPORT": "true",
    "TS_DISABLE_PORTMAPPER": "1",
    "TS_ASSUME_NETWORK_UP_FOR_TEST": "1",
    "TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
    "TS_DEBUG_LOG_RATE": "all",
}



class TailscaleError(RuntimeError):
    """tailscaled did not start, or a CLI answer could not be used."""


def _completed_from_timeout(exc: subprocess.TimeoutExpired) -> subprocess.CompletedProcess[str]:
    def text(v: Any) -> str:
        return v.decode(errors="replace") if isinstance(v, bytes) else (v or "")

    return subprocess.CompletedProcess(
        exc.cmd,
        -9,
        text(exc.stdout),
        text(exc.stderr) + f"\n[harness] timed out after {exc.timeout}s",
    )


class Tailscaled(NamespacedProcess):
    """One tailscaled process in `host`'s namespace with its own state dir, socket and log."""

    def __init__(
        self,
        host: Host,
        version: str,
        workdir: str | os.PathLike[str],
        *,
        userspace: bool = False,
        env: Mapping[str, str] | None = None,
        ssl_cert_file: str | os.PathLike[str] | None = None,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        start: bool = True,
        start_timeout: float = 30,
    ) -> None:
        self.version = version
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(host, self.workdir / "tailscaled.log")
        self.statedir = self.workdir / "state"
        self.statedir.mkdir(exist_ok=True)
        self.logs_dir = self.workdir / "logs"
        self.logs_dir.mkdir(exist_ok=True)
        self.tailscale = versions.tailscale_bin(version)
        self.tailscaled = versions.tailscaled_bin(version)
        for b in (self.tailscale, self.tailscaled):
            if not b.is_file():
                raise TailscaleError(f"{b} missing: run `make clients`")
        self.socket = self.short_socket(self.workdir / "tailscaled.sock", "phts-")
        # Unique per host namespace, so several daemons may share a host.
        index = getattr(host, "_tailscaled_count", 0)
        host._tailscaled_count = index + 1  # type: ignore[attr-defined]
        self.userspace = userspace
        self.tun = "userspace-networking" if userspace else f"ts{index}"
        self.port = port if port is not None else (41641 if index == 0 else 0)
        self.env = dict(BASE_ENV)
        self.env["TS_LOGS_DIR"] = str(self.logs_dir)
        if ssl_cert_file is not None:
            self.env["SSL_CERT_FILE"] = str(ssl_cert_file)
        if env:
            self.env.update(env)
        self.extra_args = list(extra_args)
        if start:
            self.start(timeout=start_timeout)

    def __repr__(self) -> str:
        return f"<Tailscaled {self.version} on {self.host.name} tun={self.tun}>"

    # -- process lifecycle -------------------------------------------------------------------

    def argv(self) -> list[str]:
        return [
            str(self.tailscaled),
            f"--tun={self.tun}",
            f"--statedir={self.statedir}",
            f"--socket={self.socket}",
            f"--port={self.port}",
            "--no-logs-no-support",
            "--verbose=1",
            *self.extra_args,
        ]

    def start(self, timeout: float = 30) -> None:
        if self.running:
            raise TailscaleError(f"{self!r} already running")
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.spawn(self.argv(), env=self.env)
        self.wait_socket(timeout)

    def wait_socket(self, timeout: float = 30) -> None:
        """Wait until the CLI gets an answer through the socket."""
        last = ""

        def answers() -> bool:
            nonlocal last
            if not self.socket.exists():
                return False
            res = self.cli("status", "--json", timeout=10)
            last = res.stderr.strip()
            return res.stdout.lstrip().startswith("{")

        self.wait_ready(answers, timeout, TailscaleError,
                        lambda: f"no answer on {self.socket} ({last})")

    # -- CLI ---------------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`tailscale --socket=... <args>` inside the host's namespace; never raises on failure.

        Runs in the namespace because some subcommands (netcheck, debug derp) do their own
        networking in the CLI process.
        """
        argv = [str(self.tailscale), f"--socket={self.socket}", *args]
        try:
            return self.host.run(argv, timeout=timeout, env=self.env)
        except subprocess.TimeoutExpired as exc:
            return _completed_from_timeout(exc)

    def up(
        self,
        login_server: str,
        authkey: str | None = None,
        *,
        hostname: str | None = None,
        extra_args: Sequence[str] = (),
        timeout: float = 60,
        accept_dns: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "up",
            f"--login-server={login_server}",
            f"--hostname={hostname or self.host.name}",
            f"--accept-dns={'true' if accept_dns else 'false'}",
            f"--timeout={int(timeout)}s",
        ]
        if authkey is not None:
            args.append(f"--authkey={authkey}")
        args.extend(extra_args)
        res = self.cli(*args, timeout=timeout + 20)
        if res.returncode == 0 and not self.userspace:
            self.wait_tun_address()
        return res

    def wait_tun_address(self, timeout: float = 20) -> None:
        """Wait until the tailnet IPv4 is on the TUN interface. Clients may report Running
        before the router has configured it, and a service binding that address fails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            want = self.ip("4")
            have = self.host.run(["ip", "-4", "-o", "addr", "show", "dev", self.tun]).stdout
            if want and all(f"inet {a}/" in have for a in want):
                return
            time.sleep(0.2)
        raise TailscaleError(f"{self!r}: tailnet address not on {self.tun} after {timeout}s")

    def down(self, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.cli("down", timeout=timeout)

    def logout(self, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.cli("logout", timeout=timeout)

    def _cli_json(self, what: str, *args: str, timeout: float) -> dict[str, Any]:
        res = self.cli(*args, timeout=timeout)
        try:
            data = json.loads(res.stdout)
        except json.JSONDecodeError as exc:
            raise TailscaleError(
                f"{what} gave no JSON (exit {res.returncode}): {res.stderr.strip()}"
            ) from exc
        if not isinstance(data, dict):
            raise TailscaleError(f"{what} gave {type(data).__name__}")
        return data

    def status_json(self, timeout: float = 30) -> dict[str, Any]:
        return self._cli_json("status --json", "status", "--json", timeout=timeout)

    def netmap(self, timeout: float = 30) -> dict[str, Any]:
        """The client's current network map (`tailscale debug netmap`): what control sent,
        peers' Hostinfo included, before the client derives its status from it."""
        return self._cli_json("debug netmap", "debug", "netmap", timeout=timeout)

    def backend_state(self) -> str:
        return str(self.status_json().get("BackendState", ""))

    def wait_state(self, state: str = "Running", timeout: float = 60) -> dict[str, Any]:
        """Poll `status --json` until BackendState == state; returns the last status."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            st = self.status_json()
            if st.get("BackendState") == state:
                return st
            time.sleep(0.5)
        raise TailscaleError(
            f"{self!r}: BackendState {st.get('BackendState')!r} != {state!r} after {timeout}s"
        )

    def ip(self, family: str | None = None) -> list[str]:
        """Tailscale addresses (`family` "4" or "6" to filter); [] when it has none yet."""
        args = ["ip"] + ([f"-{family}"] if family else [])
        res = self.cli(*args, timeout=30)
        if res.returncode != 0:
            return []
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    def ping(
        self,
        target: str,
        *,
        count: int = 10,
        timeout: float = 5,
        until_direct: bool = True,
        extra_args: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        args = [
            "ping",
            f"--c={count}",
            f"--timeout={timeout}s",
            f"--until-direct={'true' if until_direct else 'false'}",
            *extra_args,
            target,
        ]
        return self.cli(*args, timeout=count * timeout + 30)

    def netcheck(
        self, *, json_format: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        args = ["netcheck"] + (["--format=json"] if json_format else [])
        return self.cli(*args, timeout=timeout)

    def version_text(self) -> str:
        return self.cli("version", timeout=30).stdout
