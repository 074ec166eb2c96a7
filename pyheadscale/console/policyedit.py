"""Access controls: the policy editor, server-side checks with the error's line and column,
the policy's tests run before saving, a diff before applying, and earlier versions.

Saving goes through AdminActions.set_policy, the same call as PUT /api/v1/policy, which
compiles the policy, runs its `tests` and stores it; the preview step runs the same checks
without storing (PolicyController.check).
"""

from __future__ import annotations

import asyncio
import difflib
import re
from dataclasses import dataclass

from aiohttp import web

from pyheadscale.api.audited import Seen
from pyheadscale.api.errors import APIError
from pyheadscale.console.views import iso
from pyheadscale.console.web import ID, Access, Console, path_id, read_form, route
from pyheadscale.policy import HuJSONError, PolicyError
from pyheadscale.policy.hujson import Path, value_positions
from pyheadscale.state.policystore import PolicyNotFound, PolicyReadError

# "acls[0].src[1]", 'groups["group:x"]', "autoApprovers.routes[\"10.0.0.0/8\"]", "tests[2]"
_PATH = re.compile(r'^(?:parsing policy: )?([A-Za-z]+(?:\[(?:\d+|"(?:[^"\\]|\\.)*")\]'
                   r'|\.[A-Za-z]+)*)(?=[: ])')
_SEGMENT = re.compile(r'\[(\d+)\]|\["((?:[^"\\]|\\.)*)"\]|\.?([A-Za-z]+)')


@dataclass(frozen=True)
class Problem:
    message: str
    line: int | None
    column: int | None


def error_path(message: str) -> list[tuple[str, str | int]] | None:
    """The document path an error message starts with: ("field"|"key"|"index", value)."""
    m = _PATH.match(message)
    if m is None:
        return None
    if not re.search(r"[.\[]", m.group(1)) and not message[m.end():].startswith(":"):
        return None  # one plain word followed by a space is prose, not a path
    out: list[tuple[str, str | int]] = []
    for idx, key, name in _SEGMENT.findall(m.group(1)):
        if idx:
            out.append(("index", int(idx)))
        elif name:
            out.append(("field", name))
        else:
            out.append(("key", key.replace('\\"', '"').replace("\\\\", "\\")))
    return out


def _same(stored: Path, want: list[tuple[str, str | int]]) -> bool:
    if len(stored) != len(want):
        return False
    for have, (kind, value) in zip(stored, want, strict=True):
        if kind == "index":
            if have != value:
                return False
        elif kind == "key":
            if have != value:
                return False
        elif not isinstance(have, str) or have.casefold() != str(value).casefold():
            return False  # struct fields match case-insensitively, as the decoder does
    return True


def locate(text: str, message: str) -> tuple[int, int] | None:
    """Where in `text` the problem an error message names is, or None."""
    want = error_path(message)
    if not want:
        return None
    try:
        positions = value_positions(text)
    except HuJSONError:
        return None
    # The longest prefix of the path that exists (an unknown field names its parent).
    for n in range(len(want), 0, -1):
        for stored, at in positions.items():
            if _same(stored, want[:n]):
                return at
    return None


def problems(text: str, e: PolicyError) -> list[Problem]:
    if isinstance(e, HuJSONError):
        return [Problem(e.message, e.line, e.column)]
    out = []
    for msg in e.errors[:50]:
        at = locate(text, msg)
        out.append(Problem(msg, at[0] if at else None, at[1] if at else None))
    return out


def diff_lines(old: str, new: str) -> list[tuple[str, str]]:
    """A unified diff as (kind, line) pairs: kind is "add", "del", "hunk" or "ctx"."""
    out: list[tuple[str, str]] = []
    for line in difflib.unified_diff(old.splitlines(), new.splitlines(), "running", "new",
                                     lineterm="", n=3):
        if line.startswith(("---", "+++")):
            continue
        kind = ("hunk" if line.startswith("@@") else "add" if line.startswith("+")
                else "del" if line.startswith("-") else "ctx")
        out.append((kind, line))
    return out


class PolicyPages:
    def __init__(self, console: Console) -> None:
        self.c = console
        console.mount(self)

    @property
    def writable(self) -> bool:
        return self.c.deps.policy.mode == "database"

    async def _current(self) -> str:
        try:
            return (await self.c.deps.policy.get()).data
        except (PolicyNotFound, PolicyReadError):
            return ""

    def _editor(self, request: web.Request, text: str, *, found: list[Problem] | None = None,
                code: int = 200) -> web.Response:
        lines = text.splitlines()
        marked = {p.line for p in found or [] if p.line}
        # Two lines either side of each problem, numbered as the editor numbers them.
        shown = sorted({i for ln in marked for i in range(max(ln - 2, 1), ln + 3)
                        if i <= len(lines)})
        excerpt = [(i, lines[i - 1], i in marked) for i in shown]
        return self.c.render(request, "policy.html", title="Access controls", text=text,
                             problems=found or [], excerpt=excerpt, writable=self.writable,
                             mode=self.c.deps.policy.mode, code=code)

    @route("GET", "/policy", Access.READ)
    async def page(self, request: web.Request) -> web.StreamResponse:
        return self._editor(request, await self._current())

    # Checking changes nothing: an auditor may try a policy too.
    @route("POST", "/policy/preview", Access.READ)
    async def preview(self, request: web.Request) -> web.StreamResponse:
        text = (await read_form(request)).get("policy", "")
        try:
            await self.c.deps.policy.check(text)
        except PolicyError as e:
            return self._editor(request, text, found=problems(text, e), code=422)
        old = await self._current()
        return self.c.render(request, "policy_preview.html", title="Review policy change",
                             text=text, diff=diff_lines(old, text), unchanged=old == text,
                             writable=self.writable)

    @route("POST", "/policy/apply", Access.WRITE)
    async def apply(self, request: web.Request) -> web.StreamResponse:
        text = (await read_form(request)).get("policy", "")
        try:
            await self.c.deps.actions.set_policy(text)
        except APIError as e:
            # The API says "setting policy: <error>"; show where it is as the preview does.
            try:
                await self.c.deps.policy.check(text)
            except PolicyError as pe:
                return self._editor(request, text, found=problems(text, pe), code=422)
            return self._editor(request, text, found=[Problem(e.message, None, None)],
                                code=e.status)
        self.c.audit(request, "setPolicy", Seen(body={"policy": text}))
        self.c.flash(request, "ok", "Policy saved; clients are getting it now.")
        return self.c.redirect("/policy")

    @route("GET", "/policy/history", Access.READ)
    async def history(self, request: web.Request) -> web.StreamResponse:
        versions = []
        if self.c.deps.policy.mode == "database":
            rows = await asyncio.to_thread(self.c.deps.policy.store.history, 200)
            versions = [{"id": v.id, "when": iso(v.updated_at), "size": len(v.data),
                         "current": i == 0} for i, v in enumerate(rows)]
        return self.c.render(request, "policy_history.html", title="Policy history",
                             versions=versions, mode=self.c.deps.policy.mode)

    @route("GET", f"/policy/history/{ID}", Access.READ)
    async def version(self, request: web.Request) -> web.StreamResponse:
        vid = path_id(request)
        v = await asyncio.to_thread(self.c.deps.policy.store.version, vid)
        if v is None:
            return self.c.render(request, "error.html", code=404, title="Policy version",
                                 message=f"There is no stored policy version {vid}.")
        current = await self._current()
        return self.c.render(request, "policy_version.html", title=f"Policy version {vid}",
                             v=v, when=iso(v.updated_at), diff=diff_lines(current, v.data),
                             writable=self.writable)
