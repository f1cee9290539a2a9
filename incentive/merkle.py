"""Merkle trees of a round's settlement, laid out as OpenZeppelin's StandardMerkleTree.

A leaf is ``keccak256(keccak256(abi.encode(roundId, org, score, reward, flags)))`` (hashed twice,
so that no leaf can be mistaken for an inner node), inner nodes hash their children as a sorted
pair, leaves are sorted by hash and laid out as in ``@openzeppelin/merkle-tree``: the same values
give the same root and proofs as that library, and every proof verifies with OpenZeppelin's
``MerkleProof.verify``, which the ledger's ``claimReward`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eth_abi.abi import encode
from eth_utils.address import to_checksum_address

from fedledger.incentive.commitment import keccak

LEAF_TYPES = ("uint256", "address", "int256", "uint256", "uint256")


@dataclass(frozen=True)
class SettlementLeaf:
    """One organisation's settlement in a round: what it may claim."""

    round_id: int
    organisation: str
    score: int  # signed fixed point, 1e18 = 1.0
    reward: int  # token units
    flags: int

    def hash(self) -> bytes:
        encoded = encode(
            LEAF_TYPES,
            [
                self.round_id,
                to_checksum_address(self.organisation),
                self.score,
                self.reward,
                self.flags,
            ],
        )
        return keccak(keccak(encoded))


def _hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b if a < b else b + a)


@dataclass(frozen=True)
class SettlementTree:
    """The tree over a round's leaves: its root, and a proof for each leaf."""

    leaves: tuple[SettlementLeaf, ...]
    nodes: tuple[bytes, ...]  # the whole tree, root first, as @openzeppelin/merkle-tree stores it
    positions: dict[str, int]  # organisation (lower case) -> index of its leaf in ``nodes``

    @classmethod
    def build(cls, leaves: Sequence[SettlementLeaf]) -> SettlementTree:
        if not leaves:
            raise ValueError("a settlement tree needs at least one leaf")
        seen: set[str] = set()
        for leaf in leaves:
            key = leaf.organisation.lower()
            if key in seen:
                raise ValueError(f"organisation {leaf.organisation} appears twice")
            seen.add(key)
        hashed = sorted((leaf.hash(), leaf) for leaf in leaves)
        size = 2 * len(hashed) - 1
        nodes: list[bytes] = [b""] * size
        positions: dict[str, int] = {}
        for i, (digest, leaf) in enumerate(hashed):
            nodes[size - 1 - i] = digest
            positions[leaf.organisation.lower()] = size - 1 - i
        for i in range(size - 1 - len(hashed), -1, -1):
            nodes[i] = _hash_pair(nodes[2 * i + 1], nodes[2 * i + 2])
        return cls(tuple(leaves), tuple(nodes), positions)

    @property
    def root(self) -> bytes:
        return self.nodes[0]

    @property
    def total_reward(self) -> int:
        return sum(leaf.reward for leaf in self.leaves)

    def leaf_of(self, organisation: str) -> SettlementLeaf:
        for leaf in self.leaves:
            if leaf.organisation.lower() == organisation.lower():
                return leaf
        raise KeyError(f"{organisation} has no leaf in this settlement")

    def proof(self, organisation: str) -> list[bytes]:
        """The sibling hashes from ``organisation``'s leaf up to the root."""
        index = self.positions.get(organisation.lower())
        if index is None:
            raise KeyError(f"{organisation} has no leaf in this settlement")
        proof: list[bytes] = []
        while index > 0:
            sibling = index - 1 if index % 2 == 0 else index + 1
            proof.append(self.nodes[sibling])
            index = (index - 1) // 2
        return proof


def verify(proof: Sequence[bytes], root: bytes, leaf: SettlementLeaf) -> bool:
    """Whether ``proof`` shows ``leaf`` under ``root`` (MerkleProof.verify, in Python)."""
    node = leaf.hash()
    for sibling in proof:
        node = _hash_pair(node, sibling)
    return node == root
