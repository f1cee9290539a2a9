// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {AccessControlEnumerable} from "@openzeppelin/contracts/access/extensions/AccessControlEnumerable.sol";
import {RewardToken} from "./RewardToken.sol";

/// @title fedledger incentive ledger
/// @notice Records, for every federated learning round, the global model hash, each
/// organisation's commitment to its model update, and the contribution scores and token
/// rewards that the coordinator settles. Anyone can read every record.
/// @dev Roles: the admin (DEFAULT_ADMIN_ROLE) registers organisations and grants roles;
/// the coordinator (COORDINATOR_ROLE) opens and finalizes rounds; registered organisations
/// (ORGANISATION_ROLE) commit updates. Scores are signed fixed point, 1e18 = 1.0.
contract FedLedger is AccessControlEnumerable {
    /// @notice Role of the service that opens, aggregates and settles rounds.
    bytes32 public constant COORDINATOR_ROLE = keccak256("COORDINATOR_ROLE");
    /// @notice Role of a registered organisation (a consortium member that trains).
    bytes32 public constant ORGANISATION_ROLE = keccak256("ORGANISATION_ROLE");

    /// @notice Life cycle of a round: None (never opened), Open (taking commitments), Finalized.
    enum RoundState {
        None,
        Open,
        Finalized
    }

    /// @notice One round's public record.
    struct Round {
        bytes32 modelHash; // keccak256 of the canonical bytes of the global model w_r
        bytes32 newModelHash; // keccak256 of the aggregated model w_{r+1} (zero until finalized)
        uint64 deadline; // unix seconds; commitments after it revert
        RoundState state;
        uint32 commitCount;
        uint256 totalReward; // token units paid when the round was finalized
    }

    struct Commitment {
        bytes32 updateHash;
        uint256 numSamples;
    }

    struct Settlement {
        int256 score;
        uint256 reward;
        bool settled;
    }

    RewardToken private immutable _token;
    uint256 private _roundCount;
    mapping(uint256 roundId => Round) private _rounds;
    mapping(uint256 roundId => mapping(address org => Commitment)) private _commitments;
    mapping(uint256 roundId => mapping(address org => Settlement)) private _settlements;

    /// @notice The zero address was given where an account is required.
    error ZeroAddress();
    /// @notice `org` is already a registered organisation.
    error OrganisationAlreadyRegistered(address org);
    /// @notice `account` is not a registered organisation.
    error OrganisationNotRegistered(address account);
    /// @notice Rounds are opened in sequence: the next one is `expected`, not `given`.
    error RoundOutOfOrder(uint256 expected, uint256 given);
    /// @notice Round `roundId` is still open; finalize it before opening the next.
    error PreviousRoundOpen(uint256 roundId);
    /// @notice A deadline must lie in the future: `deadline` <= block time `nowTs`.
    error DeadlineInPast(uint64 deadline, uint256 nowTs);
    /// @notice An extension must move the deadline later than `current`, not to `given`.
    error DeadlineNotLater(uint64 current, uint64 given);
    /// @notice A model or update hash must not be zero.
    error ZeroHash();
    /// @notice A commitment must declare at least one training sample.
    error ZeroSamples();
    /// @notice Round `roundId` is in `state`, not Open.
    error RoundNotOpen(uint256 roundId, RoundState state);
    /// @notice Round `roundId` stopped taking commitments at `deadline`; block time is `nowTs`.
    error CommitmentDeadlinePassed(uint256 roundId, uint64 deadline, uint256 nowTs);
    /// @notice `org` already committed `updateHash` in round `roundId`; a commitment is final.
    error AlreadyCommitted(uint256 roundId, address org, bytes32 updateHash);
    /// @notice The settlement arrays differ in length.
    error LengthMismatch(uint256 orgs, uint256 scores, uint256 rewards);
    /// @notice `org` made no commitment in round `roundId`, so it cannot be scored or paid.
    error NotCommitted(uint256 roundId, address org);
    /// @notice `org` appears twice in round `roundId`'s settlement.
    error DuplicateSettlement(uint256 roundId, address org);

    /// @notice The admin registered `org` as a consortium organisation.
    event OrganisationRegistered(address indexed org);
    /// @notice The coordinator opened round `roundId` on the global model `modelHash`.
    event RoundOpened(uint256 indexed roundId, bytes32 modelHash, uint64 deadline);
    /// @notice `org` committed to the update `updateHash` trained on `numSamples` samples.
    event UpdateCommitted(uint256 indexed roundId, address indexed org, bytes32 updateHash, uint256 numSamples);
    /// @notice `org` was scored `score` (1e18 = 1.0) and paid `reward` token units for round `roundId`.
    event ContributionRecorded(uint256 indexed roundId, address indexed org, int256 score, uint256 reward);
    /// @notice The coordinator moved round `roundId`'s deadline from `previousDeadline` to `deadline`.
    event RoundExtended(uint256 indexed roundId, uint64 previousDeadline, uint64 deadline);
    /// @notice Round `roundId` closed with the new global model `newModelHash`.
    event RoundFinalized(uint256 indexed roundId, bytes32 newModelHash, uint256 totalReward, uint256 organisations);

    /// @param admin The consortium admin: registers organisations and manages roles.
    /// @param coordinator The account of the coordinator service.
    /// @param tokenName Name of the reward token this ledger deploys and alone mints.
    /// @param tokenSymbol Symbol of the reward token.
    constructor(address admin, address coordinator, string memory tokenName, string memory tokenSymbol) {
        if (admin == address(0) || coordinator == address(0)) revert ZeroAddress();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(COORDINATOR_ROLE, coordinator);
        _token = new RewardToken(tokenName, tokenSymbol);
    }

    // ------------------------------------------------------------------ admin

    /// @notice Registers `org` as an organisation that may commit updates and be paid.
    /// @dev Admin only. Reverts with OrganisationAlreadyRegistered for a member.
    /// @param org The organisation's Ethereum account.
    function registerOrganisation(address org) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (org == address(0)) revert ZeroAddress();
        if (!_grantRole(ORGANISATION_ROLE, org)) revert OrganisationAlreadyRegistered(org);
        emit OrganisationRegistered(org);
    }

    // ------------------------------------------------------------ coordinator

    /// @notice Opens round `roundId` on the global model `modelHash`, taking commitments until `deadline`.
    /// @dev Coordinator only. Rounds are numbered 1, 2, ... and the previous one must be finalized.
    /// @param roundId Must equal roundCount() + 1.
    /// @param modelHash keccak256 of the canonical bytes of the global model of this round.
    /// @param deadline Unix seconds after which commitments revert; must be in the future.
    function openRound(uint256 roundId, bytes32 modelHash, uint64 deadline) external onlyRole(COORDINATOR_ROLE) {
        uint256 last = _roundCount;
        if (roundId != last + 1) revert RoundOutOfOrder(last + 1, roundId);
        if (last != 0 && _rounds[last].state == RoundState.Open) revert PreviousRoundOpen(last);
        if (modelHash == bytes32(0)) revert ZeroHash();
        if (deadline <= block.timestamp) revert DeadlineInPast(deadline, block.timestamp);

        _roundCount = roundId;
        Round storage round = _rounds[roundId];
        round.modelHash = modelHash;
        round.deadline = deadline;
        round.state = RoundState.Open;
        emit RoundOpened(roundId, modelHash, deadline);
    }

    /// @notice Gives the organisations until `deadline` to commit to round `roundId`.
    /// @dev Coordinator only; the round must be open and the new deadline later than the old
    /// one and in the future (used when a round misses its quorum and policy says extend).
    /// @param roundId The open round.
    /// @param deadline The new deadline, unix seconds.
    function extendRound(uint256 roundId, uint64 deadline) external onlyRole(COORDINATOR_ROLE) {
        Round storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        uint64 previous = round.deadline;
        if (deadline <= previous) revert DeadlineNotLater(previous, deadline);
        if (deadline <= block.timestamp) revert DeadlineInPast(deadline, block.timestamp);
        round.deadline = deadline;
        emit RoundExtended(roundId, previous, deadline);
    }

    /// @notice Closes round `roundId`: records the new global model, each organisation's
    /// contribution score and reward, and mints the rewards to the organisations.
    /// @dev Coordinator only; once per round. Every listed organisation must have committed in
    /// the round and appear once. Empty arrays close a round without payouts.
    /// @param roundId The open round.
    /// @param newModelHash keccak256 of the canonical bytes of the aggregated model.
    /// @param orgs Organisations scored in this round.
    /// @param scores Contribution scores, signed fixed point with 1e18 = 1.0.
    /// @param rewards Token units paid to each organisation.
    function finalizeRound(
        uint256 roundId,
        bytes32 newModelHash,
        address[] calldata orgs,
        int256[] calldata scores,
        uint256[] calldata rewards
    ) external onlyRole(COORDINATOR_ROLE) {
        Round storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        if (orgs.length != scores.length || orgs.length != rewards.length) {
            revert LengthMismatch(orgs.length, scores.length, rewards.length);
        }
        if (newModelHash == bytes32(0)) revert ZeroHash();

        uint256 total;
        for (uint256 i = 0; i < orgs.length; ++i) {
            address org = orgs[i];
            if (_commitments[roundId][org].updateHash == bytes32(0)) revert NotCommitted(roundId, org);
            Settlement storage settlement = _settlements[roundId][org];
            if (settlement.settled) revert DuplicateSettlement(roundId, org);
            settlement.score = scores[i];
            settlement.reward = rewards[i];
            settlement.settled = true;
            total += rewards[i];
            emit ContributionRecorded(roundId, org, scores[i], rewards[i]);
        }
        round.newModelHash = newModelHash;
        round.state = RoundState.Finalized;
        round.totalReward = total;
        emit RoundFinalized(roundId, newModelHash, total, orgs.length);

        for (uint256 i = 0; i < orgs.length; ++i) {
            if (rewards[i] != 0) _token.mint(orgs[i], rewards[i]);
        }
    }

    // ----------------------------------------------------------- organisation

    /// @notice Commits the caller's model update for round `roundId`: its hash and sample count.
    /// @dev Registered organisations only; once per round; before the round's deadline.
    /// @param roundId The open round.
    /// @param updateHash keccak256 of the canonical bytes of the update the caller will upload.
    /// @param numSamples Number of local training samples behind the update (FedAvg weight).
    function commitUpdate(uint256 roundId, bytes32 updateHash, uint256 numSamples) external {
        if (!hasRole(ORGANISATION_ROLE, msg.sender)) revert OrganisationNotRegistered(msg.sender);
        Round storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        if (block.timestamp > round.deadline) {
            revert CommitmentDeadlinePassed(roundId, round.deadline, block.timestamp);
        }
        if (updateHash == bytes32(0)) revert ZeroHash();
        if (numSamples == 0) revert ZeroSamples();
        Commitment storage commitment = _commitments[roundId][msg.sender];
        if (commitment.updateHash != bytes32(0)) {
            revert AlreadyCommitted(roundId, msg.sender, commitment.updateHash);
        }

        commitment.updateHash = updateHash;
        commitment.numSamples = numSamples;
        round.commitCount += 1;
        emit UpdateCommitted(roundId, msg.sender, updateHash, numSamples);
    }

    // ------------------------------------------------------------------ views

    /// @notice The reward token this ledger mints.
    function token() external view returns (address) {
        return address(_token);
    }

    /// @notice The number of rounds opened so far (the id of the latest round).
    function roundCount() external view returns (uint256) {
        return _roundCount;
    }

    /// @notice The public record of round `roundId` (all zero for a round never opened).
    function getRound(uint256 roundId) external view returns (Round memory) {
        return _rounds[roundId];
    }

    /// @notice What `org` committed in round `roundId` (zero hash if nothing).
    function commitmentOf(uint256 roundId, address org) external view returns (bytes32 updateHash, uint256 numSamples) {
        Commitment storage commitment = _commitments[roundId][org];
        return (commitment.updateHash, commitment.numSamples);
    }

    /// @notice `org`'s contribution score in round `roundId`, signed fixed point with 1e18 = 1.0.
    function contributionOf(uint256 roundId, address org) external view returns (int256) {
        return _settlements[roundId][org].score;
    }

    /// @notice Token units paid to `org` for round `roundId`.
    function rewardOf(uint256 roundId, address org) external view returns (uint256) {
        return _settlements[roundId][org].reward;
    }

    /// @notice Whether `org` was scored in round `roundId`'s settlement.
    function isSettled(uint256 roundId, address org) external view returns (bool) {
        return _settlements[roundId][org].settled;
    }

    /// @notice Whether `account` is a registered organisation.
    function isOrganisation(address account) external view returns (bool) {
        return hasRole(ORGANISATION_ROLE, account);
    }

    /// @notice Every registered organisation (enumeration order; it may change when a role is revoked).
    function organisations() external view returns (address[] memory) {
        return getRoleMembers(ORGANISATION_ROLE);
    }
}
