"""Go's %q quoting: Headscale's messages quote user input this way, and ours match them."""

from __future__ import annotations


def goquote(s: str) -> str:
    """Go's %q for a string: printable runes kept, the rest escaped."""
    out = ['"']
    for ch in s:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif not ch.isprintable():
            o = ord(ch)
            out.append(
                f"\\x{o:02x}" if o < 0x80 else (f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
            )
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
