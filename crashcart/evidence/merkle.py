"""RFC 6962 Merkle tree hashing for evidence checkpoints, kept as an O(log n) frontier."""

from __future__ import annotations

from hashlib import sha256
from typing import Iterable, Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
EMPTY_ROOT = sha256(b"").digest()


def leaf_hash(raw: bytes) -> bytes:
    """RFC 6962 leaf hash of one record's raw line bytes (no trailing newline)."""
    return sha256(LEAF_PREFIX + raw).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash."""
    return sha256(NODE_PREFIX + left + right).digest()


def tree_root(leaves: Sequence[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of `leaves` (leaf hashes), by the recursive definition.

    O(n) and recursive: the reference the frontier is tested against, not for the ledger's hot path.
    """
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = 1 << ((n - 1).bit_length() - 1)  # largest power of two strictly below n
    return node_hash(tree_root(leaves[:k]), tree_root(leaves[k:]))


class Frontier:
    """The roots of the perfect subtrees that make up a tree of `count` leaves, largest first.

    A tree of n leaves decomposes by the binary digits of n into perfect subtrees of 2^a > 2^b > ...
    leaves; folding them right to left gives exactly the RFC 6962 shape (split at the largest power
    of two below n), so appending a leaf and computing the root both cost O(log n).
    """

    __slots__ = ("count", "nodes")

    def __init__(self, count: int = 0, nodes: Iterable[bytes] = ()) -> None:
        self.count = count
        self.nodes = list(nodes)
        if len(self.nodes) != bin(count).count("1"):
            raise ValueError(f"a frontier of {count} leaves has {bin(count).count('1')} nodes, not {len(self.nodes)}")

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash."""
        nodes = self.nodes
        nodes.append(leaf)
        c = self.count
        # Each trailing 1 bit of the old count is a perfect subtree the new leaf completes.
        while c & 1:
            right = nodes.pop()
            nodes[-1] = sha256(NODE_PREFIX + nodes[-1] + right).digest()
            c >>= 1
        self.count += 1

    def append_raw(self, raw: bytes) -> None:
        """Add the leaf for one record's raw line bytes."""
        self.append(sha256(LEAF_PREFIX + raw).digest())

    def root(self) -> bytes:
        """The RFC 6962 tree hash of all leaves so far."""
        if not self.nodes:
            return EMPTY_ROOT
        nodes = self.nodes
        acc = nodes[-1]
        for i in range(len(nodes) - 2, -1, -1):
            acc = sha256(NODE_PREFIX + nodes[i] + acc).digest()
        return acc

    def copy(self) -> "Frontier":
        """An independent copy."""
        return Frontier(self.count, self.nodes)

    def to_hex(self) -> list[str]:
        """The subtree roots as hex strings (for the prune anchor record)."""
        return [n.hex() for n in self.nodes]

    @classmethod
    def from_hex(cls, count: int, nodes: Sequence[str]) -> "Frontier":
        """Rebuild a frontier saved with `to_hex`; raises ValueError when malformed."""
        decoded = [bytes.fromhex(n) for n in nodes]
        if any(len(n) != 32 for n in decoded):
            raise ValueError("a frontier node is not a 32-byte SHA-256 digest")
        return cls(count, decoded)
