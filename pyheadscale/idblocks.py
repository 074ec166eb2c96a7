"""Sets of node IDs as blocks of bits: 128 IDs per block, one small int per block.

The policy hands the mapper each viewer's peer set in this form and a map stream records
the peers its client holds in it too (mapper/known.py), so "which peers did a policy change
add or remove for this viewer" is a few int operations per block instead of one set
operation per peer. Blocks are keyed by ID >> 7, so sparse IDs cost one block per live ID
at worst, never memory in proportion to the highest ID.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import TypeVar

__all__ = ["BLOCK", "FULL", "LOW", "SHIFT", "IdBlocks", "blocks_of", "offsets"]

_T = TypeVar("_T")

BLOCK = 128  # node IDs per block of bits
SHIFT = BLOCK.bit_length() - 1
LOW = BLOCK - 1
FULL = (1 << BLOCK) - 1
# Set bit offsets of each byte value: turns a block's bits into IDs a byte at a time.
_BYTE_OFFSETS = tuple(tuple(i for i in range(8) if b >> i & 1) for b in range(256))


def offsets(bits: int) -> Iterator[int]:
    """The set bits' offsets in a block, ascending."""
    if bits == FULL:
        yield from range(BLOCK)
        return
    for byte_at, byte in enumerate(bits.to_bytes(BLOCK // 8, "little")):
        if byte:
            yield from map((byte_at * 8).__add__, _BYTE_OFFSETS[byte])


def blocks_of(ids: Iterable[int]) -> dict[int, int]:
    """``ids`` as block -> bits."""
    blocks: dict[int, int] = {}
    for pid in ids:
        block = pid >> SHIFT
        blocks[block] = blocks.get(block, 0) | 1 << (pid & LOW)
    return blocks


class IdBlocks(AbstractSet[int]):
    """An immutable set of node IDs held as block -> bits (no block stored as 0).

    Iterates in ascending ID order. Equal sets have equal ``blocks``."""

    __slots__ = ("blocks", "_len")

    def __init__(self, blocks: Mapping[int, int]) -> None:
        self.blocks: Mapping[int, int] = blocks
        self._len: int | None = None

    @classmethod
    def of(cls, ids: Iterable[int]) -> IdBlocks:
        return cls(blocks_of(ids))

    @classmethod
    def _from_iterable(cls, it: Iterable[_T]) -> frozenset[_T]:
        # What set algebra (|, &, -) on an IdBlocks returns: a plain frozenset.
        return frozenset(it)

    def __contains__(self, pid: object) -> bool:
        if not isinstance(pid, int) or pid < 0:
            return False
        return bool(self.blocks.get(pid >> SHIFT, 0) >> (pid & LOW) & 1)

    def __iter__(self) -> Iterator[int]:
        for block in sorted(self.blocks):
            yield from map((block << SHIFT).__add__, offsets(self.blocks[block]))

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(b.bit_count() for b in self.blocks.values())
        return self._len

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IdBlocks):
            return self.blocks == other.blocks
        return super().__eq__(other)

    def __hash__(self) -> int:
        return self._hash()

    def __repr__(self) -> str:
        return f"IdBlocks({sorted(self)!r})"

    def covers(self, blocks: Iterable[tuple[int, int]]) -> bool:
        """Whether every (block, bits) pair's IDs are in this set: a dict lookup per block
        instead of a membership test per ID."""
        got = self.blocks
        return all(got.get(block, 0) & bits == bits for block, bits in blocks)

    def without(self, pid: int) -> IdBlocks:
        """This set less ``pid`` (itself when ``pid`` is not in it)."""
        if pid not in self:
            return self
        blocks = dict(self.blocks)
        block = pid >> SHIFT
        bits = blocks[block] ^ 1 << (pid & LOW)
        if bits:
            blocks[block] = bits
        else:
            del blocks[block]
        return IdBlocks(blocks)
