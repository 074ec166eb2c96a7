"""Pages of the OIDC login: the registration confirmation, success and refusal pages.

Wording follows Headscale 0.29 (templates/register_confirm.go, templates/auth_success.go).
Every value is HTML-escaped here, so callers pass raw strings.
"""

from __future__ import annotations

from html import escape


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n"
    )


def register_confirm(*, form_action: str, csrf_name: str, csrf_token: str, user: str,
                     hostname: str, os_name: str, machine_key: str) -> str:
    """The interstitial the signed-in user must submit before the node is registered."""
    rows = [("Hostname", hostname), ("OS", os_name or "(unknown)"),
            ("Machine key", machine_key), ("Registered to", user)]
    table = "\n".join(
        f'<tr><th scope="row">{escape(k)}</th><td class="{escape(k.lower().replace(" ", "-"))}">'
        + (f"<code>{escape(v)}</code>" if k == "Machine key" else escape(v)) + "</td></tr>"
        for k, v in rows)
    body = (
        "<h2>Confirm node registration</h2>\n"
        "<p>A device is asking to be added to your tailnet. Please review the details below "
        "and confirm that this device is yours.</p>\n"
        f"<table>\n{table}\n</table>\n"
        f'<form method="POST" action="{escape(form_action)}">'
        f'<input type="hidden" name="{escape(csrf_name)}" value="{escape(csrf_token)}">'
        '<button type="submit">Confirm registration</button></form>\n'
        "<p>If you do not recognise this device, close this window. The registration request "
        "will expire automatically.</p>"
    )
    return _page("Headscale - Confirm node registration", body)


def auth_success(*, new_node: bool, user: str) -> str:
    verb, heading = ("Registered", "Node registered") if new_node else (
        "Reauthenticated", "Node reauthenticated")
    body = (f"<h2>{escape(heading)}</h2>\n<p>{escape(verb)} as <strong>{escape(user)}</strong>."
            "</p>\n<p>You can now close this window.</p>")
    return _page(f"Headscale - {heading}", body)


def ssh_check_authorized(*, user: str) -> str:
    """An SSH check-mode session approved by the signed-in owner of its source node."""
    body = (f"<h2>SSH session authorized</h2>\n<p>Authorized as <strong>{escape(user)}"
            "</strong>.</p>\n<p>You may return to your terminal.</p>")
    return _page("Headscale - SSH Session Authorized", body)


def ssh_check_cli(*, auth_id: str) -> str:
    """Without OIDC, an SSH check is approved by an admin on the server."""
    body = ("<h2>Authentication check</h2>\n<p>Run the command below in the headscale server "
            "to approve this authentication request:</p>\n"
            f"<pre><code>headscale auth approve --auth-id {escape(auth_id)}</code></pre>")
    return _page("Headscale - Authentication check", body)


def auth_error(*, status: int, message: str) -> str:
    """A refusal: the reason in one sentence, nothing registered."""
    body = (f"<h2>Login refused</h2>\n<p class=\"error\">{escape(message)}</p>\n"
            "<p>No device was registered. Close this window and try again, or ask your "
            f"administrator.</p>\n<p><small>HTTP {status}</small></p>")
    return _page("Headscale - Login refused", body)
