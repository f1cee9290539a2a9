// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {FedLedger} from "../FedLedger.sol";
import {RewardToken} from "../RewardToken.sol";

/// @dev The few Foundry cheatcodes these tests use (forge-std is not installable offline).
interface Vm {
    function prank(address sender) external;
    function startPrank(address sender) external;
    function stopPrank() external;
    function warp(uint256 timestamp) external;
    function expectRevert(bytes calldata revertData) external;
    function expectRevert(bytes4 selector) external;
    function expectRevert() external;
    function assume(bool condition) external pure;
}

/// @dev Accounts, a deployed ledger with three registered organisations, and small helpers
/// shared by the fuzz tests and the invariant handler.
abstract contract LedgerFixture {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));

    address internal constant ADMIN = address(0xA11CE);
    address internal constant COORDINATOR = address(0xC00D);
    address internal constant OUTSIDER = address(0x0B5E);
    uint256 internal constant NUM_ORGS = 4; // the first three registered at deployment
    uint256 internal constant BUDGET = 1e30;
    bytes32 internal constant MODEL = keccak256("model");

    FedLedger internal ledger;
    RewardToken internal token;
    address[NUM_ORGS] internal orgs = [address(0x1001), address(0x1002), address(0x1003), address(0x1004)];

    function _deploy() internal {
        ledger = new FedLedger(ADMIN, COORDINATOR, "fedledger reward", "FLR");
        token = RewardToken(ledger.token());
        vm.startPrank(ADMIN);
        ledger.setTaskSpec(keccak256("spec"));
        ledger.setRoundBudget(BUDGET);
        for (uint256 i = 0; i < NUM_ORGS - 1; ++i) {
            ledger.registerOrganisation(orgs[i]);
        }
        vm.stopPrank();
    }

    function _open(uint256 duration) internal returns (uint256 roundId) {
        roundId = ledger.roundCount() + 1;
        vm.prank(COORDINATOR);
        ledger.openRound(roundId, MODEL, uint64(block.timestamp + duration));
    }

    function _commit(address org, uint256 roundId, uint256 numSamples) internal {
        vm.prank(org);
        ledger.commitUpdate(roundId, keccak256(abi.encode(roundId, org)), numSamples);
    }

    /// @dev OpenZeppelin StandardMerkleTree's leaf of one settlement.
    function _leaf(uint256 roundId, address org, int256 score, uint256 reward, uint256 flags)
        internal
        pure
        returns (bytes32)
    {
        return keccak256(bytes.concat(keccak256(abi.encode(roundId, org, score, reward, flags))));
    }

    function _hashPair(bytes32 a, bytes32 b) internal pure returns (bytes32) {
        return a < b ? keccak256(abi.encode(a, b)) : keccak256(abi.encode(b, a));
    }

    /// @dev Root of four leaves, H(H(l0, l1), H(l2, l3)), and the proof of leaf `i`.
    function _root4(bytes32[4] memory leaves) internal pure returns (bytes32) {
        return _hashPair(_hashPair(leaves[0], leaves[1]), _hashPair(leaves[2], leaves[3]));
    }

    function _proof4(bytes32[4] memory leaves, uint256 i) internal pure returns (bytes32[] memory proof) {
        proof = new bytes32[](2);
        proof[0] = leaves[i ^ 1];
        proof[1] = i < 2 ? _hashPair(leaves[2], leaves[3]) : _hashPair(leaves[0], leaves[1]);
    }

    function _noValuation() internal pure returns (FedLedger.Valuation memory) {
        return FedLedger.Valuation({method: bytes32("none"), seed: 0, validationHash: bytes32(0)});
    }

    function _eq(uint256 a, uint256 b, string memory what) internal pure {
        require(a == b, what);
    }
}
