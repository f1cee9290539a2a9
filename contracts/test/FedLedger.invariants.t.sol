// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {FedLedger} from "../FedLedger.sol";
import {RewardToken} from "../RewardToken.sol";
import {LedgerFixture} from "./Base.sol";

/// @notice Drives the ledger through random rounds: every role acting in and out of turn.
/// Each call goes to the ledger as its actor would send it; a call the rules forbid that
/// nonetheless succeeds is counted in `violations` (with the rule in `lastViolation`), and
/// what was paid is tallied in `paid`, so that the invariants can compare the chain with it.
contract LedgerHandler is LedgerFixture {
    struct Tree {
        bytes32[4] leaves;
        address[4] owners;
        int256[4] scores;
        uint256[4] rewards;
        uint256[4] flags;
        bool posted;
    }

    uint256 public paid;
    uint256 public violations;
    string public lastViolation;
    mapping(uint256 roundId => mapping(address org => uint256 count)) public claims;
    mapping(uint256 roundId => Tree) internal _trees;

    constructor() {
        _deploy();
    }

    function theLedger() external view returns (FedLedger) {
        return ledger;
    }

    /// @notice Every account that acts: the four organisations (the last unregistered at
    /// first), an outsider, the coordinator and the admin.
    function actors() public view returns (address[7] memory) {
        return [orgs[0], orgs[1], orgs[2], orgs[3], OUTSIDER, COORDINATOR, ADMIN];
    }

    function _actor(uint256 seed) internal view returns (address) {
        return actors()[seed % 7];
    }

    function _violate(string memory rule) internal {
        violations += 1;
        lastViolation = rule;
    }

    function _commitsClosed(FedLedger.Round memory round) internal view returns (bool) {
        return block.timestamp > round.deadline || round.commitCount >= ledger.activeOrganisations();
    }

    // ------------------------------------------------------------ the protocol

    function open(uint256 duration) external {
        uint256 roundId = ledger.roundCount() + 1;
        vm.prank(COORDINATOR);
        try ledger.openRound(roundId, MODEL, uint64(block.timestamp + 1 + duration % 600)) {} catch {}
    }

    function commit(uint256 who, uint256 samples) external {
        address org = _actor(who);
        uint256 roundId = ledger.roundCount();
        FedLedger.Round memory round = ledger.getRound(roundId);
        bool member = ledger.isOrganisation(org) && !ledger.retirementOf(org).retired;
        vm.prank(org);
        try ledger.commitUpdate(roundId, keccak256(abi.encode(roundId, org, samples)), 1 + samples % 1000) {
            if (!member) _violate("only an active organisation commits");
            if (block.timestamp > round.deadline) _violate("no commitment after the deadline");
            if (round.state != FedLedger.RoundState.Open) _violate("commitments only to an open round");
        } catch {}
    }

    function warp(uint256 seconds_) external {
        vm.warp(block.timestamp + seconds_ % 900);
    }

    function extend(uint256 seconds_) external {
        uint256 roundId = ledger.roundCount();
        FedLedger.Round memory round = ledger.getRound(roundId);
        vm.prank(COORDINATOR);
        try ledger.extendRound(roundId, round.deadline + 1 + uint64(seconds_ % 600)) {
            if (block.timestamp > round.deadline) _violate("no extension after the deadline");
        } catch {}
    }

    function finalizeDirectly(uint256 seed) external {
        uint256 roundId = ledger.roundCount();
        FedLedger.Round memory round = ledger.getRound(roundId);
        bool closed = _commitsClosed(round);
        address[] memory committers = ledger.committersOf(roundId);
        int256[] memory scores = new int256[](committers.length);
        uint256[] memory rewards = new uint256[](committers.length);
        uint256[] memory flags = new uint256[](committers.length);
        uint256 total;
        for (uint256 i = 0; i < committers.length; ++i) {
            scores[i] = int256(uint256(uint16(seed >> (16 * i)))) - 30000;
            rewards[i] = uint256(uint64(seed >> (64 + 32 * i))) * 1e9;
            flags[i] = uint8(seed >> (200 + 8 * i)) % 3 == 0 ? uint8(seed >> (200 + 8 * i)) : 0;
            total += rewards[i];
        }
        vm.prank(COORDINATOR);
        try ledger.finalizeRound(roundId, MODEL, _noValuation(), committers, scores, rewards, flags) {
            if (!closed) _violate("no settlement during the commit phase");
            paid += total;
        } catch {}
    }

    /// @dev Builds a four-leaf tree over the committers (padded with the outsider's leaves,
    /// which cannot claim) and posts it, announcing the flagged in ascending order. With
    /// `misannounce`, one committer is announced with flags its leaf does not carry.
    function finalizeByRoot(uint256 seed, bool misannounce, bool shortTotal) external {
        uint256 roundId = ledger.roundCount();
        FedLedger.Round memory round = ledger.getRound(roundId);
        bool closed = _commitsClosed(round);
        address[] memory committers = ledger.committersOf(roundId);
        Tree storage tree = _trees[roundId];
        if (tree.posted) return;
        uint256 total;
        uint256 numFlagged;
        for (uint256 i = 0; i < 4; ++i) {
            address owner = i < committers.length ? committers[i] : OUTSIDER;
            tree.owners[i] = owner;
            tree.scores[i] = int256(uint256(uint16(seed >> (16 * i)))) - 30000;
            tree.rewards[i] = uint256(uint32(seed >> (64 + 32 * i))) * 1e9;
            tree.flags[i] = (i < committers.length && uint8(seed >> (200 + 8 * i)) % 3 == 0)
                ? 1 + uint8(seed >> (200 + 8 * i)) % 255
                : 0;
            tree.leaves[i] = _leaf(roundId, owner, tree.scores[i], tree.rewards[i], tree.flags[i]);
            total += tree.rewards[i];
            if (tree.flags[i] != 0) numFlagged += 1;
        }
        (address[] memory flagged, uint256[] memory words) = _announcement(tree, numFlagged, misannounce);
        vm.prank(COORDINATOR);
        try ledger.finalizeRoundWithRoot(
            roundId, MODEL, _noValuation(), _root4(tree.leaves), shortTotal ? total / 2 : total, 4, flagged, words
        ) {
            if (!closed) _violate("no settlement during the commit phase");
            tree.posted = true;
        } catch {}
    }

    function _announcement(Tree storage tree, uint256 numFlagged, bool misannounce)
        internal
        view
        returns (address[] memory flagged, uint256[] memory words)
    {
        if (misannounce && numFlagged == 0 && tree.owners[0] != OUTSIDER) {
            flagged = new address[](1);
            words = new uint256[](1);
            (flagged[0], words[0]) = (tree.owners[0], 16);
            return (flagged, words);
        }
        flagged = new address[](numFlagged);
        words = new uint256[](numFlagged);
        uint256 n;
        for (uint256 i = 0; i < 4; ++i) {
            if (tree.flags[i] == 0) continue;
            // insertion sort by address: the ledger takes announcements in ascending order
            uint256 j = n++;
            while (j > 0 && flagged[j - 1] > tree.owners[i]) {
                (flagged[j], words[j]) = (flagged[j - 1], words[j - 1]);
                --j;
            }
            (flagged[j], words[j]) = (tree.owners[i], misannounce ? tree.flags[i] % 255 + 1 : tree.flags[i]);
        }
    }

    function claim(uint256 roundSeed, uint256 leafSeed) external {
        uint256 count = ledger.roundCount();
        if (count == 0) return;
        uint256 roundId = 1 + roundSeed % count;
        Tree storage tree = _trees[roundId];
        uint256 i = leafSeed % 4;
        address owner = tree.owners[i];
        uint256 announced = ledger.flagsOf(roundId, owner);
        vm.prank(owner);
        try ledger.claimReward(roundId, tree.scores[i], tree.rewards[i], tree.flags[i], _proof4(tree.leaves, i)) {
            if (!tree.posted) _violate("claims only against a posted root");
            if (tree.flags[i] != announced) _violate("a claim carries the announced flags");
            claims[roundId][owner] += 1;
            if (claims[roundId][owner] > 1) _violate("no second claim");
            paid += tree.rewards[i];
        } catch {}
    }

    // -------------------------------------------------------------- membership

    function register(uint256 who) external {
        address account = _actor(who);
        vm.prank(ADMIN);
        try ledger.registerOrganisation(account) {
            if (ledger.hasRole(ledger.COORDINATOR_ROLE(), account)) _violate("the coordinator is no organisation");
        } catch {}
    }

    function revoke(uint256 who) external {
        vm.prank(ADMIN);
        try ledger.revokeOrganisation(_actor(who)) {} catch {}
    }

    function retire(uint256 who, uint64 epsilon) external {
        vm.prank(_actor(who));
        try ledger.retire(epsilon) {} catch {}
    }

    // ---------------------------------------------------------- out of turn

    /// @notice Someone tries what only a role (or nobody) may do.
    function attack(uint256 who, uint256 what) external {
        address caller = _actor(who);
        bytes32 organisationRole = ledger.ORGANISATION_ROLE();
        bytes32 coordinatorRole = ledger.COORDINATOR_ROLE();
        uint256 kind = what % 6;
        vm.prank(caller);
        if (kind == 0) {
            try ledger.grantRole(organisationRole, caller) {
                _violate("the organisation role only by registration");
            } catch {}
        } else if (kind == 1) {
            address member = orgs[what / 6 % NUM_ORGS];
            bool wasMember = ledger.isOrganisation(member);
            try ledger.grantRole(coordinatorRole, member) {
                if (wasMember || caller != ADMIN) _violate("the coordinator role to the admin's pick, never a member");
                vm.prank(ADMIN);
                ledger.revokeRole(coordinatorRole, member); // keep one coordinator
            } catch {}
        } else if (kind == 2) {
            try token.mint(caller, 1) {
                _violate("only the ledger mints");
            } catch {}
        } else if (kind == 3) {
            try ledger.grantRole(bytes32(0), caller) {
                _violate("the admin role moves in two steps");
            } catch {}
        } else if (kind == 4) {
            try ledger.registerOrganisation(OUTSIDER) {
                if (caller != ADMIN) _violate("only the admin registers");
                vm.prank(ADMIN);
                ledger.revokeOrganisation(OUTSIDER);
            } catch {}
        } else {
            uint256 roundId = ledger.roundCount();
            address[] memory none = new address[](0);
            try ledger.finalizeRound(
                roundId, MODEL, _noValuation(), none, new int256[](0), new uint256[](0), new uint256[](0)
            ) {
                if (caller != COORDINATOR) _violate("only the coordinator settles");
                // counts cannot change within the call: read after it, as they were during it
                if (!_commitsClosed(ledger.getRound(roundId))) {
                    _violate("no settlement during the commit phase");
                }
            } catch {}
        }
    }
}

/// @notice The ledger's invariants, checked after every call of every random sequence.
contract FedLedgerInvariantTest {
    struct FuzzSelector {
        address addr;
        bytes4[] selectors;
    }

    LedgerHandler internal handler;
    FedLedger internal ledger;
    RewardToken internal token;

    function setUp() public {
        handler = new LedgerHandler();
        ledger = handler.theLedger();
        token = RewardToken(ledger.token());
    }

    function targetContracts() public view returns (address[] memory targets) {
        targets = new address[](1);
        targets[0] = address(handler);
    }

    function targetSelectors() public view returns (FuzzSelector[] memory targets) {
        bytes4[] memory selectors = new bytes4[](12);
        selectors[0] = LedgerHandler.open.selector;
        selectors[1] = LedgerHandler.commit.selector;
        selectors[2] = LedgerHandler.commit.selector; // commitments are most of a round's calls
        selectors[3] = LedgerHandler.warp.selector;
        selectors[4] = LedgerHandler.extend.selector;
        selectors[5] = LedgerHandler.finalizeDirectly.selector;
        selectors[6] = LedgerHandler.finalizeByRoot.selector;
        selectors[7] = LedgerHandler.claim.selector;
        selectors[8] = LedgerHandler.register.selector;
        selectors[9] = LedgerHandler.revoke.selector;
        selectors[10] = LedgerHandler.attack.selector;
        selectors[11] = LedgerHandler.retire.selector;
        targets = new FuzzSelector[](1);
        targets[0] = FuzzSelector({addr: address(handler), selectors: selectors});
    }

    function invariant_noRuleBroken() public view {
        require(handler.violations() == 0, handler.lastViolation());
    }

    function invariant_supplyIsWhatWasPaid() public view {
        address[7] memory actors = handler.actors();
        uint256 recorded;
        uint256 balances;
        for (uint256 i = 0; i < actors.length; ++i) {
            recorded += ledger.totalRewardOf(actors[i]);
            balances += token.balanceOf(actors[i]);
        }
        require(token.totalSupply() == handler.paid(), "supply == payouts");
        require(recorded == handler.paid(), "recorded == payouts");
        require(balances == handler.paid(), "balances == payouts");
    }

    function invariant_roundsAddUp() public view {
        uint256 count = ledger.roundCount();
        uint256 claimed;
        for (uint256 r = 1; r <= count; ++r) {
            FedLedger.Round memory round = ledger.getRound(r);
            require(round.claimedReward <= round.totalReward, "claimed <= total");
            require(r == count || round.state == FedLedger.RoundState.Finalized, "one open round: the latest");
            require(ledger.committersOf(r).length == round.commitCount, "every committer listed");
            claimed += round.claimedReward;
        }
        require(claimed == handler.paid(), "the rounds paid what was minted");
    }

    function invariant_rolesStayApart() public view {
        address[7] memory actors = handler.actors();
        bytes32 coordinatorRole = ledger.COORDINATOR_ROLE();
        uint256 active;
        for (uint256 i = 0; i < actors.length; ++i) {
            bool member = ledger.isOrganisation(actors[i]);
            require(!(member && ledger.hasRole(coordinatorRole, actors[i])), "no coordinating member");
            if (member && !ledger.retirementOf(actors[i]).retired) active += 1;
        }
        require(ledger.activeOrganisations() == active, "active == registered and not retired");
        require(ledger.getRoleMemberCount(coordinatorRole) == 1, "one coordinator");
        require(ledger.defaultAdmin() == address(0xA11CE), "the admin stays");
    }
}
