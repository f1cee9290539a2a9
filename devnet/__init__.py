"""Local chains for fedledger: the in-process EVM (default), anvil, and contract deployment."""
