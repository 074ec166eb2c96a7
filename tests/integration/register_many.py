"""Register N machines at once with the Python test client (run inside a namespace):

    python register_many.py URL AUTHKEY N HOSTNAME

Every machine has its own keys and Noise connection; at most 25 register at a time. Prints
one JSON line: {"ok": count, "errors": [first few errors]}. Used to show that concurrent
registrations on several instances never share an address or a name.
"""

from __future__ import annotations

import asyncio
import json
import sys

from pyheadscale.noise.keys import generate_private_key, nodekey, public_key
from pyheadscale.testclient.client import connect, fetch_key

CAPVER = 113
ZERO_NODEKEY = "nodekey:" + "0" * 64


async def main(url: str, authkey: str, count: int, hostname: str) -> dict[str, object]:
    server_key = await fetch_key(url, CAPVER)
    sem = asyncio.Semaphore(25)
    errors: list[str] = []

    async def one(i: int) -> bool:
        machine = generate_private_key()
        node_pub = public_key(generate_private_key())
        reg = {"Version": CAPVER, "NodeKey": nodekey(node_pub), "OldNodeKey": ZERO_NODEKEY,
               "Auth": {"AuthKey": authkey}, "Expiry": "0001-01-01T00:00:00Z",
               "Followup": "", "Hostinfo": {"Hostname": hostname, "OS": "linux"}}
        async with sem:
            try:
                conn = await connect(url, machine, CAPVER, server_public_key=server_key,
                                     dial_timeout=60)
                async with conn:
                    status, _, body = await conn.request("POST", "/machine/register",
                                                         json.dumps(reg).encode())
            except Exception as e:  # reported, the others go on
                errors.append(f"{i}: {type(e).__name__}: {e}"[:200])
                return False
        resp = json.loads(body) if status == 200 else {}
        if status != 200 or resp.get("Error") or not resp.get("MachineAuthorized"):
            errors.append(f"{i}: HTTP {status} {body[:200]!r}")
            return False
        return True

    results = await asyncio.gather(*(one(i) for i in range(count)))
    return {"ok": sum(results), "errors": errors[:5]}


if __name__ == "__main__":
    out = asyncio.run(asyncio.wait_for(
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]), 300))
    print(json.dumps(out))
