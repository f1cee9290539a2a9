// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {IAccessControlDefaultAdminRules} from
    "@openzeppelin/contracts/access/extensions/IAccessControlDefaultAdminRules.sol";
import {FedLedger} from "../FedLedger.sol";
import {LedgerFixture} from "./Base.sol";

/// @notice Fuzz tests of the ledger's rules: who may hold which role, the two phases of a
/// round, announcements and claims, and the packed storage's ranges.
contract FedLedgerRulesTest is LedgerFixture {
    function setUp() public {
        _deploy();
    }

    // ------------------------------------------------------------------ roles

    function testFuzz_organisationRoleOnlyThroughRegistration(address caller, address account) public {
        bytes32 role = ledger.ORGANISATION_ROLE();
        vm.prank(caller);
        vm.expectRevert(FedLedger.OrganisationRoleManaged.selector);
        ledger.grantRole(role, account);
        vm.prank(caller);
        vm.expectRevert(FedLedger.OrganisationRoleManaged.selector);
        ledger.revokeRole(role, orgs[0]);
        vm.prank(orgs[0]);
        vm.expectRevert(FedLedger.OrganisationRoleManaged.selector);
        ledger.renounceRole(role, orgs[0]);
        require(ledger.isOrganisation(orgs[0]), "a member stays a member");
    }

    function test_coordinatorCannotBeAnOrganisation() public {
        vm.prank(ADMIN);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.CoordinatorCannotBeOrganisation.selector, COORDINATOR));
        ledger.registerOrganisation(COORDINATOR);
        bytes32 coordinatorRole = ledger.COORDINATOR_ROLE();
        vm.prank(ADMIN);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.CoordinatorCannotBeOrganisation.selector, orgs[1]));
        ledger.grantRole(coordinatorRole, orgs[1]);
        require(!ledger.hasRole(coordinatorRole, orgs[1]), "no organisation scores itself");
    }

    function test_revocationEndsMembershipButKeepsTheRecord() public {
        uint256 roundId = _open(100);
        _commit(orgs[0], roundId, 10);
        _eq(ledger.activeOrganisations(), 3, "three active");
        vm.prank(OUTSIDER);
        vm.expectRevert(
            abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, OUTSIDER, bytes32(0))
        );
        ledger.revokeOrganisation(orgs[1]);
        vm.prank(ADMIN);
        ledger.revokeOrganisation(orgs[1]);
        _eq(ledger.activeOrganisations(), 2, "two active");
        require(!ledger.isOrganisation(orgs[1]), "revoked");
        vm.prank(orgs[1]);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.OrganisationNotRegistered.selector, orgs[1]));
        ledger.commitUpdate(roundId, keccak256("late"), 5);
        vm.prank(ADMIN);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.OrganisationNotRegistered.selector, orgs[1]));
        ledger.revokeOrganisation(orgs[1]);
        // Registering again restores it, once, and lists it once.
        vm.prank(ADMIN);
        ledger.registerOrganisation(orgs[1]);
        _eq(ledger.activeOrganisations(), 3, "three again");
        _commit(orgs[1], roundId, 7);
        address[] memory committers = ledger.committersOf(roundId);
        _eq(committers.length, 2, "two committers");
        require(committers[0] == orgs[0] && committers[1] == orgs[1], "in commit order");
    }

    function test_retiringLeavesTheActiveCount() public {
        vm.prank(orgs[2]);
        ledger.retire(3e18);
        _eq(ledger.activeOrganisations(), 2, "retired is not active");
        vm.prank(ADMIN);
        ledger.revokeOrganisation(orgs[2]); // already inactive: the count stays
        _eq(ledger.activeOrganisations(), 2, "revoking a retired member");
        FedLedger.Retirement memory retirement = ledger.retirementOf(orgs[2]);
        require(retirement.retired && retirement.epsilon == 3e18, "retirement kept");
    }

    function testFuzz_adminMovesOnlyAfterTheDelay(uint32 early) public {
        uint256 delay = ledger.INITIAL_ADMIN_DELAY();
        vm.assume(early < delay);
        vm.prank(ADMIN);
        vm.expectRevert(IAccessControlDefaultAdminRules.AccessControlEnforcedDefaultAdminRules.selector);
        ledger.grantRole(bytes32(0), OUTSIDER);
        vm.prank(ADMIN);
        ledger.beginDefaultAdminTransfer(OUTSIDER);
        uint256 start = block.timestamp;
        vm.warp(start + early);
        vm.prank(OUTSIDER);
        vm.expectRevert();
        ledger.acceptDefaultAdminTransfer();
        require(ledger.defaultAdmin() == ADMIN, "not before the delay");
        vm.warp(start + delay + 1);
        vm.prank(OUTSIDER);
        ledger.acceptDefaultAdminTransfer();
        require(ledger.defaultAdmin() == OUTSIDER, "after it");
        require(!ledger.hasRole(bytes32(0), ADMIN), "one admin");
    }

    // -------------------------------------------------------------- two phases

    function testFuzz_finalizeWaitsForTheCommitPhase(uint16 duration, uint16 elapsed) public {
        vm.assume(duration > 0);
        uint256 roundId = _open(duration);
        uint64 deadline = uint64(block.timestamp + duration);
        _commit(orgs[0], roundId, 10);
        vm.warp(block.timestamp + elapsed);
        require(ledger.commitsClosed(roundId) == (block.timestamp > deadline), "closed past the deadline");
        address[] memory none = new address[](0);
        if (block.timestamp <= deadline) {
            vm.prank(COORDINATOR);
            vm.expectRevert(abi.encodeWithSelector(FedLedger.CommitPhaseOpen.selector, roundId, deadline, 1, 3));
            ledger.finalizeRound(roundId, MODEL, _noValuation(), none, new int256[](0), new uint256[](0), new uint256[](0));
            vm.prank(COORDINATOR);
            vm.expectRevert(abi.encodeWithSelector(FedLedger.CommitPhaseOpen.selector, roundId, deadline, 1, 3));
            ledger.finalizeRoundWithRoot(roundId, MODEL, _noValuation(), MODEL, 0, 0, none, new uint256[](0));
            // Once every active organisation committed, the phase is over early.
            _commit(orgs[1], roundId, 10);
            _commit(orgs[2], roundId, 10);
            require(ledger.commitsClosed(roundId), "all committed");
        }
        vm.prank(COORDINATOR);
        ledger.finalizeRound(roundId, MODEL, _noValuation(), none, new int256[](0), new uint256[](0), new uint256[](0));
        require(!ledger.commitsClosed(roundId), "a finalized round takes nothing");
    }

    function testFuzz_extensionOnlyBeforeTheDeadline(uint16 duration, uint16 elapsed, uint16 more) public {
        vm.assume(duration > 0 && more > 0);
        uint256 roundId = _open(duration);
        uint64 deadline = uint64(block.timestamp + duration);
        vm.warp(block.timestamp + elapsed);
        vm.prank(COORDINATOR);
        if (block.timestamp > deadline) {
            vm.expectRevert(
                abi.encodeWithSelector(FedLedger.CommitmentDeadlinePassed.selector, roundId, deadline, block.timestamp)
            );
            ledger.extendRound(roundId, deadline + more);
            _eq(ledger.getRound(roundId).deadline, deadline, "deadline unchanged");
        } else {
            ledger.extendRound(roundId, deadline + more);
            _eq(ledger.getRound(roundId).deadline, deadline + more, "deadline moved");
        }
    }

    // ------------------------------------------------------ announcements, claims

    function testFuzz_announcementsAscendOnce(uint8 flagsA, uint8 flagsB, bool swap) public {
        vm.assume(flagsA != 0 && flagsB != 0);
        uint256 roundId = _open(100);
        for (uint256 i = 0; i < 3; ++i) {
            _commit(orgs[i], roundId, 10);
        }
        address[] memory flagged = new address[](2);
        uint256[] memory flags = new uint256[](2);
        (flagged[0], flagged[1]) = swap ? (orgs[1], orgs[0]) : (orgs[0], orgs[0]);
        (flags[0], flags[1]) = (flagsA, flagsB);
        vm.prank(COORDINATOR);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.FlaggedNotAscending.selector, 1, flagged[1]));
        ledger.finalizeRoundWithRoot(roundId, MODEL, _noValuation(), MODEL, 0, 3, flagged, flags);
        (flagged[0], flagged[1]) = (orgs[0], orgs[1]);
        flags[1] = 0;
        vm.prank(COORDINATOR);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.FlagsOutOfRange.selector, orgs[1], 0));
        ledger.finalizeRoundWithRoot(roundId, MODEL, _noValuation(), MODEL, 0, 3, flagged, flags);
        flags[1] = 256 + uint256(flagsB);
        vm.prank(COORDINATOR);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.FlagsOutOfRange.selector, orgs[1], flags[1]));
        ledger.finalizeRoundWithRoot(roundId, MODEL, _noValuation(), MODEL, 0, 3, flagged, flags);
        flags[1] = flagsB;
        vm.prank(COORDINATOR);
        ledger.finalizeRoundWithRoot(roundId, MODEL, _noValuation(), MODEL, 0, 3, flagged, flags);
        _eq(ledger.flagsOf(roundId, orgs[0]), flagsA, "announced A");
        _eq(ledger.flagsOf(roundId, orgs[1]), flagsB, "announced B");
    }

    function testFuzz_aClaimCarriesTheAnnouncedFlags(uint8 announced, uint8 claimed, uint64 reward) public {
        vm.assume(announced != 0);
        uint256 roundId = _open(100);
        for (uint256 i = 0; i < 3; ++i) {
            _commit(orgs[i], roundId, 10);
        }
        // Both leaves are in the tree: the one with the announced flags and one with others.
        bytes32[4] memory leaves = [
            _leaf(roundId, orgs[0], 1e18, reward, announced),
            _leaf(roundId, orgs[0], 1e18, reward, claimed),
            _leaf(roundId, orgs[1], 2e18, 0, 0),
            _leaf(roundId, orgs[2], 3e18, 0, 0)
        ];
        address[] memory flagged = new address[](1);
        uint256[] memory flags = new uint256[](1);
        (flagged[0], flags[0]) = (orgs[0], announced);
        vm.prank(COORDINATOR);
        ledger.finalizeRoundWithRoot(roundId, MODEL, _noValuation(), _root4(leaves), reward, 3, flagged, flags);
        if (claimed != announced) {
            vm.prank(orgs[0]);
            vm.expectRevert(
                abi.encodeWithSelector(FedLedger.FlagsMismatch.selector, roundId, orgs[0], announced, claimed)
            );
            ledger.claimReward(roundId, 1e18, reward, claimed, _proof4(leaves, 1));
        }
        vm.prank(orgs[0]);
        ledger.claimReward(roundId, 1e18, reward, announced, _proof4(leaves, 0));
        _eq(token.balanceOf(orgs[0]), reward, "paid the leaf");
        _eq(ledger.flagsOf(roundId, orgs[0]), announced, "flags kept");
        vm.prank(orgs[0]);
        vm.expectRevert(abi.encodeWithSelector(FedLedger.AlreadyClaimed.selector, roundId, orgs[0]));
        ledger.claimReward(roundId, 1e18, reward, announced, _proof4(leaves, 0));
    }

    // ---------------------------------------------------------- packed storage

    function testFuzz_packedRecordsReadBackExactly(uint40 numSamples, int96 score, uint88 reward, uint8 flags)
        public
    {
        vm.assume(numSamples > 0 && reward <= BUDGET);
        uint256 roundId = _open(100);
        _commit(orgs[1], roundId, numSamples);
        _commit(orgs[0], roundId, 1);
        _commit(orgs[2], roundId, type(uint40).max);
        address[] memory paid = new address[](1);
        int256[] memory scores = new int256[](1);
        uint256[] memory rewards = new uint256[](1);
        uint256[] memory flagBits = new uint256[](1);
        (paid[0], scores[0], rewards[0], flagBits[0]) = (orgs[1], score, reward, flags);
        vm.prank(COORDINATOR);
        ledger.finalizeRound(roundId, MODEL, _noValuation(), paid, scores, rewards, flagBits);
        (bytes32 updateHash, uint256 samples) = ledger.commitmentOf(roundId, orgs[1]);
        require(updateHash == keccak256(abi.encode(roundId, orgs[1])), "hash");
        _eq(samples, numSamples, "samples");
        require(ledger.scoreOf(roundId, orgs[1]) == score, "score");
        _eq(ledger.rewardOf(roundId, orgs[1]), reward, "reward");
        _eq(ledger.flagsOf(roundId, orgs[1]), flags, "flags");
        require(ledger.isSettled(roundId, orgs[1]) && !ledger.isSettled(roundId, orgs[0]), "settled");
        _eq(ledger.totalRewardOf(orgs[1]), reward, "total");
        FedLedger.Round memory round = ledger.getRound(roundId);
        _eq(round.totalReward, reward, "round total");
        _eq(round.claimedReward, reward, "a direct settlement pays its total");
        _eq(round.commitCount, 3, "count");
        address[] memory committers = ledger.committersOf(roundId);
        require(committers[0] == orgs[1] && committers[1] == orgs[0] && committers[2] == orgs[2], "order");
    }

    function testFuzz_valuesBeyondTheStoredRangesRevert(uint256 numSamples, int256 score, uint256 reward) public {
        uint256 roundId = _open(100);
        if (numSamples > type(uint40).max) {
            vm.prank(orgs[0]);
            vm.expectRevert(
                abi.encodeWithSelector(
                    FedLedger.ValueOutOfRange.selector, bytes32("numSamples"), numSamples, type(uint40).max
                )
            );
            ledger.commitUpdate(roundId, MODEL, numSamples);
        }
        for (uint256 i = 0; i < 3; ++i) {
            _commit(orgs[i], roundId, 10);
        }
        address[] memory paid = new address[](1);
        int256[] memory scores = new int256[](1);
        uint256[] memory rewards = new uint256[](1);
        (paid[0], scores[0], rewards[0]) = (orgs[0], score, reward);
        bool scoreFits = score >= type(int96).min && score <= type(int96).max;
        vm.prank(COORDINATOR);
        if (!scoreFits) {
            vm.expectRevert(abi.encodeWithSelector(FedLedger.ScoreOutOfRange.selector, orgs[0], score));
        } else if (reward > type(uint88).max) {
            vm.expectRevert(
                abi.encodeWithSelector(FedLedger.ValueOutOfRange.selector, bytes32("reward"), reward, type(uint88).max)
            );
        } else if (reward > BUDGET) {
            vm.expectRevert(abi.encodeWithSelector(FedLedger.RoundBudgetExceeded.selector, roundId, reward, BUDGET));
        }
        ledger.finalizeRound(roundId, MODEL, _noValuation(), paid, scores, rewards, new uint256[](1));
    }
}
