// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title fedledger reward token
/// @notice The ERC-20 token in which organisations are paid for their contributions.
/// @dev Deployed by the ledger, which is its owner and its only minter.
contract RewardToken is ERC20, Ownable {
    /// @param name_ Token name, e.g. "fedledger Reward".
    /// @param symbol_ Token symbol, e.g. "FLR".
    constructor(string memory name_, string memory symbol_) ERC20(name_, symbol_) Ownable(msg.sender) {}

    /// @notice Mints `amount` token units to `to`.
    /// @dev Only the owner (the ledger) may mint; anyone else reverts with OwnableUnauthorizedAccount.
    /// @param to The receiving organisation.
    /// @param amount Token units (18 decimals).
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
