"""Tailscale SSH between official clients: run `tailscale ssh`, judge its outcome, and wait
until a destination's netmap carries the SSH policy a scenario expects.

Nodes run `tailscale up --ssh` as root in their own namespaces (kernel TUN), so every shell
lands as root in the destination's namespace: `ip -o -4 addr` there lists the destination's
tailnet address, which proves the session ran on the peer it was meant for (Headscale's tests
compare the remote `hostname`; namespaces share one host name).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.integration.tailscale import Tailscaled
from tests.integration.world import wait_for

# What `ssh` prints when tailscaled refuses a session by policy, across the pinned versions
# (newer releases name the policy instead of the bare "Permission denied").
NO_ACCESS = ("Permission denied (tailscale)", "failed to evaluate SSH policy",
             "tailnet policy does not permit you to SSH")
WHERE = ("ip", "-o", "-4", "addr", "show")  # run remotely: lists the peer's addresses


def ssh_env(ts: Tailscaled) -> dict[str, str]:
    """A private HOME and config dir: `tailscale ssh` writes its known_hosts file there and
    ssh must not read the machine's own ~/.ssh."""
    home = ts.workdir / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    return {**ts.env, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}


def ssh_argv(ts: Tailscaled, target: str, *command: str, user: str = "root",
             connect_timeout: int = 10) -> list[str]:
    return [str(ts.tailscale), f"--socket={ts.socket}", "ssh", f"{user}@{target}",
            "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}", *command]


def tailscale_ssh(ts: Tailscaled, target: str, *command: str, user: str = "root",
                  connect_timeout: int = 10, timeout: float = 30
                  ) -> subprocess.CompletedProcess[str]:
    """`tailscale ssh user@target command...` run non-interactively from `ts`'s host."""
    argv = ssh_argv(ts, target, *command, user=user, connect_timeout=connect_timeout)
    try:
        return ts.host.run(argv, timeout=timeout, env=ssh_env(ts), input="")
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return subprocess.CompletedProcess(argv, -9, out, err + f"\n[timed out after {timeout}s]")


def start_ssh(ts: Tailscaled, target: str, *command: str,
              user: str = "root") -> subprocess.Popen[str]:
    """A `tailscale ssh` left running (check mode holds it until a verdict)."""
    return ts.host.popen(ssh_argv(ts, target, *command, user=user), env=ssh_env(ts),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)


def denied(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode != 0 and any(m in r.stderr for m in NO_ACCESS)


def addr4(ts: Tailscaled) -> str:
    return ts.ip("4")[0]


def wait_ssh_ready(client: Tailscaled, server: Tailscaled, timeout: float = 30) -> None:
    """The client's netmap knows the server's SSH host keys (published via Hostinfo)."""
    ip = addr4(server)
    wait_for(f"{client.host.name} to learn {server.host.name}'s SSH host keys",
             lambda: any(ip in (p.get("TailscaleIPs") or []) and p.get("sshHostKeys")
                         for p in (client.status_json().get("Peer") or {}).values()), timeout)


def ssh_sources(ts: Tailscaled, user: str = "root") -> set[str]:
    """The IPv4 addresses the SSH policy in `ts`'s netmap lets in as `user` (accept or
    check rules), as control sent it."""
    pol = ts.netmap().get("SSHPolicy") or {}
    out: set[str] = set()
    for rule in pol.get("rules") or ():
        act = rule.get("action") or {}
        if not (act.get("accept") or act.get("holdAndDelegate")):
            continue
        users = rule.get("sshUsers") or {}
        if users.get(user, users.get("*")):  # "" maps the user to nobody
            out |= {p["nodeIP"] for p in rule.get("principals") or () if "." in
                    p.get("nodeIP", "")}
    return out


def wait_ssh_policy(nodes: dict[str, Tailscaled], allowed: Callable[[str, str], bool],
                    timeout: float = 30, user: str = "root") -> None:
    """Every node's netmap lets in as `user` exactly the other nodes `allowed(src, dst)` says:
    the policy just set has reached all of them, so a refusal below is the new policy's."""
    ips = {n: addr4(ts) for n, ts in nodes.items()}
    for dst, ts in nodes.items():
        want = {ips[s] for s in nodes if s != dst and allowed(s, dst)}
        wait_for(f"{dst}'s netmap to let in {sorted(want)} as {user}",
                 lambda ts=ts, want=want, dst=dst: ssh_sources(ts, user) - {ips[dst]} == want,
                 timeout)


def shell_on(src: Tailscaled, dst: Tailscaled, user: str = "root",
             timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """An allowed session: retried (as Headscale's tests do) until it runs or is refused by
    policy, since a fresh peer's path may take a moment."""
    deadline = time.monotonic() + timeout
    while True:
        r = tailscale_ssh(src, addr4(dst), *WHERE, user=user)
        if r.returncode == 0 or denied(r) or time.monotonic() > deadline:
            return r
        time.sleep(1)


def judge_pairs(nodes: dict[str, Tailscaled], pairs: Iterable[tuple[str, str]],
                allowed: Callable[[str, str], bool], user: str = "root") -> None:
    """Every (src, dst) pair gets a shell on dst if `allowed`, else a policy refusal with no
    output. Pairs run a few at a time; all failures are reported together."""
    pairs = list(pairs)

    def one(pair: tuple[str, str]) -> str | None:
        src, dst = pair
        if allowed(src, dst):
            r = shell_on(nodes[src], nodes[dst], user=user)
            if r.returncode == 0 and f" {addr4(nodes[dst])}/" in r.stdout:
                return None
            return f"{src} -> {dst} as {user} should get a shell: {_outcome(r)}"
        r = tailscale_ssh(nodes[src], addr4(nodes[dst]), *WHERE, user=user)
        if denied(r) and not r.stdout.strip():
            return None
        return f"{src} -> {dst} as {user} should be refused by policy: {_outcome(r)}"

    with ThreadPoolExecutor(max_workers=4) as pool:
        problems = [p for p in pool.map(one, pairs) if p]
    assert not problems, "\n".join(problems)


def all_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    names = list(names)
    return [(a, b) for a in names for b in names if a != b]


def _outcome(r: subprocess.CompletedProcess[Any]) -> str:
    return f"exit {r.returncode}, stdout {r.stdout[-300:]!r}, stderr {r.stderr[-500:]!r}"
