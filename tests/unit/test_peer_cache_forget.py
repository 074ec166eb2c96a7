"""The control plane's peer cache drops a deleted node's entries: node IDs are never
reused, so without this every ephemeral node that ever came and went would stay encoded."""

from datetime import UTC, datetime
from pathlib import Path

from pyheadscale.mapper.known import PLAIN_VIEW
from tests.unit._statefix import key, open_control


async def test_deleted_node_leaves_the_peer_cache(tmp_path: Path) -> None:
    cp = await open_control(tmp_path)
    tn = cp.tailnet
    uid = (await tn.create_user("alice")).id
    _, full = await tn.create_preauth_key(uid, reusable=True)
    a = await tn.register_with_authkey(key(1), key(2), None, {"Hostname": "a"}, key=full)
    b = await tn.register_with_authkey(key(3), key(4), None, {"Hostname": "b"}, key=full)
    now = datetime.now(UTC)
    for n in (a, b):
        cp.peer_cache.get(tn.nodes[n.id], cp.mapctx, now, legacy_derp=False, view=PLAIN_VIEW)
        cp.peer_cache.self_node(tn.nodes[n.id], cp.mapctx, now)
    assert len(cp.peer_cache) == 2
    await tn.delete_node(b.id)
    assert len(cp.peer_cache) == 1  # a's entry stays
    await tn.delete_node(a.id)
    assert len(cp.peer_cache) == 0
    await tn.close()
