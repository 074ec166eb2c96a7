"""Create users through /api/v1 one after another for a while (run inside a namespace):

    python api_writer.py URL APIKEY PREFIX SECONDS

Each attempt is POST /api/v1/user {"name": PREFIX-<n>} with a 3 s timeout; every answer is
recorded. Prints one JSON line: [[name, status, first 200 bytes of the body], ...] (status 0:
no answer). Used to show that a PostgreSQL restart loses no acknowledged write and that
writes during the outage are refused whole.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
import urllib.error
import urllib.request


def main(url: str, apikey: str, prefix: str, seconds: float) -> list[list[object]]:
    ctx = ssl.create_default_context()
    out: list[list[object]] = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
        name = f"{prefix}-{n}"
        req = urllib.request.Request(
            f"{url}/api/v1/user", data=json.dumps({"name": name}).encode(), method="POST",
            headers={"Authorization": f"Bearer {apikey}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
                out.append([name, r.status, r.read(200).decode(errors="replace")])
        except urllib.error.HTTPError as e:
            out.append([name, e.code, e.read(200).decode(errors="replace")])
        except OSError as e:
            out.append([name, 0, str(e)[:200]])
        time.sleep(0.1)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))))
