"""fedledger: federated learning with an on-chain incentive ledger."""

__version__ = "0.1.0"
