"""The ledger side of fedledger: commitments, signed requests, the contract client, contribution and rewards."""
