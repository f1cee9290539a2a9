"""fedledger's Solidity contracts: sources, the compile step and the committed build artifacts."""
