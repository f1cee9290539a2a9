// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {AccessControlEnumerable} from "@openzeppelin/contracts/access/extensions/AccessControlEnumerable.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {RewardToken} from "./RewardToken.sol";

/// @title fedledger incentive ledger
/// @notice Records, for every federated learning round, the global model hash, each
/// organisation's commitment to its model update, and the contribution scores and token
/// rewards that the coordinator settles. Anyone can read every record.
/// @dev Roles: the admin (DEFAULT_ADMIN_ROLE) registers organisations and grants roles;
/// the coordinator (COORDINATOR_ROLE) opens and finalizes rounds; registered organisations
/// (ORGANISATION_ROLE) commit updates. Scores are signed fixed point, 1e18 = 1.0.
/// A round settles in one of two ways: directly (finalizeRound lists every organisation's
/// score and pays it in the same transaction) or by a Merkle root (finalizeRoundWithRoot posts
/// one root of (round, organisation, score, reward, flags) leaves and each organisation claims
/// its own reward with a proof), so that the coordinator's cost per round need not grow with
/// the consortium.
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
        uint256 totalReward; // token units the settlement pays out (in all, once claimed)
        bytes32 rewardsRoot; // Merkle root of the settlement leaves; zero for a direct settlement
        uint256 claimedReward; // token units paid so far (== totalReward for a direct settlement)
    }

    /// @notice How a round's scores were computed, so that any member can recompute them.
    struct Valuation {
        bytes32 method; // the valuation method's name, ASCII, left-aligned (e.g. "exact:accuracy")
        uint256 seed; // seed of a randomised method (0 for a deterministic one)
        bytes32 validationHash; // keccak256 of the canonical bytes of the validation set
    }

    struct Commitment {
        bytes32 updateHash;
        uint256 numSamples;
    }

    /// @notice An organisation that has stopped training for good, e.g. because another round
    /// would take its differential-privacy epsilon past the consortium's budget.
    struct Retirement {
        bool retired;
        uint64 sinceRound; // roundCount() when it retired: it commits in no round from then on
        uint256 epsilon; // epsilon it had spent, fixed point 1e18 = 1.0 (0: not a DP task)
    }

    struct Settlement {
        int256 score;
        uint256 reward;
        uint256 flags; // bit set of the reasons the coordinator flagged the update (0: none)
        bool settled;
    }

    RewardToken private immutable _token;
    uint256 private _roundCount;
    mapping(uint256 roundId => Round) private _rounds;
    mapping(uint256 roundId => mapping(address org => Commitment)) private _commitments;
    mapping(uint256 roundId => mapping(address org => Settlement)) private _settlements;
    mapping(uint256 roundId => Valuation) private _valuations;
    mapping(uint256 roundId => address[] orgs) private _committers;
    uint256 private _roundBudget;
    mapping(address org => uint256 maxSamples) private _sampleCaps;
    bytes32 private _taskSpec;
    mapping(uint256 roundId => mapping(address org => uint256 epsilon)) private _epsilons;
    mapping(address org => Retirement) private _retirements;
    mapping(address org => uint256 total) private _totalRewards;

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
    error LengthMismatch(uint256 orgs, uint256 scores, uint256 rewards, uint256 flags);
    /// @notice Round `roundId` was not settled by a Merkle root, so there is nothing to claim.
    error NotClaimable(uint256 roundId);
    /// @notice `org` has already been paid for round `roundId`.
    error AlreadyClaimed(uint256 roundId, address org);
    /// @notice The proof does not show (round, `org`, score, reward, flags) under round `roundId`'s root.
    error InvalidProof(uint256 roundId, address org);
    /// @notice Paying `reward` would take round `roundId` past the `remaining` units its root promised.
    error ClaimExceedsTotal(uint256 roundId, uint256 reward, uint256 remaining);
    /// @notice `org` made no commitment in round `roundId`, so it cannot be scored or paid.
    error NotCommitted(uint256 roundId, address org);
    /// @notice `org` appears twice in round `roundId`'s settlement.
    error DuplicateSettlement(uint256 roundId, address org);
    /// @notice Round `roundId` would pay `totalReward` token units, more than the per-round budget `budget`.
    error RoundBudgetExceeded(uint256 roundId, uint256 totalReward, uint256 budget);
    /// @notice `org` declared `numSamples` training samples, more than the `cap` the consortium registered for it.
    error SamplesAboveCap(address org, uint256 numSamples, uint256 cap);
    /// @notice The task spec is fixed once round 1 is open (`roundCount` rounds so far); deploy a new ledger for another task.
    error TaskSpecFrozen(uint256 roundCount);
    /// @notice No round can open before the admin records the consortium's task spec (setTaskSpec).
    error TaskSpecUnset();
    /// @notice `org` retired (from round `sinceRound` on) and takes no further part.
    error AlreadyRetired(address org, uint256 sinceRound);
    /// @notice A DP commitment must report the epsilon spent, which is never zero.
    error ZeroEpsilon();

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
    /// @notice Round `roundId`'s scores came from `method` with `seed` on the validation set `validationHash`.
    event RoundValued(uint256 indexed roundId, bytes32 method, uint256 seed, bytes32 validationHash);
    /// @notice The coordinator flagged `org`'s update in round `roundId` for the reasons in the bit set `flags`.
    event OrganisationFlagged(uint256 indexed roundId, address indexed org, uint256 flags);
    /// @notice Round `roundId` settles by claims against the Merkle root `root`.
    event RewardsRootPosted(uint256 indexed roundId, bytes32 root);
    /// @notice `org` claimed `reward` token units for round `roundId`.
    event RewardClaimed(uint256 indexed roundId, address indexed org, uint256 reward);
    /// @notice The admin changed the most one round may pay from `previousBudget` to `budget` token units.
    event RoundBudgetSet(uint256 previousBudget, uint256 budget);
    /// @notice The admin changed the most samples `org` may declare from `previousCap` to `cap` (0: no cap).
    event SampleCapSet(address indexed org, uint256 previousCap, uint256 cap);
    /// @notice The admin recorded `specHash`, the keccak256 of the task spec file, in place of `previousSpecHash`.
    event TaskSpecSet(bytes32 previousSpecHash, bytes32 specHash);
    /// @notice `org`'s commitment in round `roundId` came from DP-SGD, having spent `epsilon`
    /// (fixed point, 1e18 = 1.0) over every round it trained, this one included.
    event PrivacySpent(uint256 indexed roundId, address indexed org, uint256 epsilon);
    /// @notice `org` stopped training for good at round `sinceRound`, having spent `epsilon`.
    event OrganisationRetired(address indexed org, uint256 sinceRound, uint256 epsilon);

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

    /// @notice Sets the most one round may pay out in all, in token units: a settlement above
    /// it reverts with RoundBudgetExceeded, so the coordinator cannot mint more than the
    /// consortium agreed. Zero until the admin sets it (nothing can be paid before).
    /// @dev Admin only. Applies to rounds finalized from now on.
    /// @param budget Token units (18 decimals).
    function setRoundBudget(uint256 budget) external onlyRole(DEFAULT_ADMIN_ROLE) {
        uint256 previous = _roundBudget;
        _roundBudget = budget;
        emit RoundBudgetSet(previous, budget);
    }

    /// @notice Sets the most training samples `org` may declare in a commitment, e.g. the size
    /// of the dataset it brought to the consortium: a declared count steers FedAvg, and above
    /// the cap commitUpdate reverts with SamplesAboveCap. 0 (the default) sets no cap.
    /// @dev Admin only. Applies to commitments made from now on.
    function setSampleCap(address org, uint256 cap) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (!hasRole(ORGANISATION_ROLE, org)) revert OrganisationNotRegistered(org);
        uint256 previous = _sampleCaps[org];
        _sampleCaps[org] = cap;
        emit SampleCapSet(org, previous, cap);
    }

    /// @notice Records the consortium's task specification: the keccak256 of the spec file's
    /// bytes (model, training, metric, data schema; `cast keccak "0x$(xxd -p spec.toml | tr -d '\n')"`). Nodes
    /// train only for a coordinator that serves this spec, and no round opens without one.
    /// @dev Admin only, and only before round 1 opens (TaskSpecFrozen after).
    /// @param specHash keccak256 of the spec file; must not be zero.
    function setTaskSpec(bytes32 specHash) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (_roundCount != 0) revert TaskSpecFrozen(_roundCount);
        if (specHash == bytes32(0)) revert ZeroHash();
        bytes32 previous = _taskSpec;
        _taskSpec = specHash;
        emit TaskSpecSet(previous, specHash);
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
        if (_taskSpec == bytes32(0)) revert TaskSpecUnset();

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

    /// @notice Closes round `roundId`: records the new global model, how it was valued, each
    /// organisation's contribution score, reward and flags, and mints the rewards.
    /// @dev Coordinator only; once per round. Every listed organisation must have committed in
    /// the round and appear once. Empty arrays close a round without payouts.
    /// @param roundId The open round.
    /// @param newModelHash keccak256 of the canonical bytes of the aggregated model.
    /// @param valuation The valuation method, its seed and the validation set's hash.
    /// @param orgs Organisations scored in this round.
    /// @param scores Contribution scores, signed fixed point with 1e18 = 1.0.
    /// @param rewards Token units paid to each organisation.
    /// @param flags Each organisation's flag bits (0: not flagged).
    function finalizeRound(
        uint256 roundId,
        bytes32 newModelHash,
        Valuation calldata valuation,
        address[] calldata orgs,
        int256[] calldata scores,
        uint256[] calldata rewards,
        uint256[] calldata flags
    ) external onlyRole(COORDINATOR_ROLE) {
        _requireOpen(roundId);
        if (orgs.length != scores.length || orgs.length != rewards.length || orgs.length != flags.length) {
            revert LengthMismatch(orgs.length, scores.length, rewards.length, flags.length);
        }
        if (newModelHash == bytes32(0)) revert ZeroHash();

        uint256 total;
        for (uint256 i = 0; i < orgs.length; ++i) {
            total += _settle(roundId, orgs[i], scores[i], rewards[i], flags[i]);
        }
        _close(roundId, newModelHash, valuation, total, orgs.length).claimedReward = total;

        for (uint256 i = 0; i < orgs.length; ++i) {
            if (rewards[i] != 0) _token.mint(orgs[i], rewards[i]);
        }
    }

    /// @notice Closes round `roundId` with one Merkle root of its settlement: each organisation
    /// then claims its own reward with a proof (claimReward). The coordinator's cost does not
    /// grow with the number of organisations paid, only with the number it flags.
    /// @dev Coordinator only; once per round. Leaves are OpenZeppelin StandardMerkleTree leaves,
    /// keccak256(bytes.concat(keccak256(abi.encode(roundId, org, score, reward, flags)))).
    /// @param roundId The open round.
    /// @param newModelHash keccak256 of the canonical bytes of the aggregated model.
    /// @param valuation The valuation method, its seed and the validation set's hash.
    /// @param root Merkle root of the round's settlement leaves (one per scored organisation).
    /// @param totalReward Sum of the leaves' rewards: claims never pay out more.
    /// @param numOrganisations Number of leaves under the root.
    /// @param flaggedOrgs Organisations the coordinator flagged, announced now (each also has
    /// its flags in its leaf); every one must have committed in the round.
    /// @param flags The flag bits of each of `flaggedOrgs`.
    function finalizeRoundWithRoot(
        uint256 roundId,
        bytes32 newModelHash,
        Valuation calldata valuation,
        bytes32 root,
        uint256 totalReward,
        uint256 numOrganisations,
        address[] calldata flaggedOrgs,
        uint256[] calldata flags
    ) external onlyRole(COORDINATOR_ROLE) {
        _requireOpen(roundId);
        if (flaggedOrgs.length != flags.length) {
            revert LengthMismatch(flaggedOrgs.length, flags.length, flags.length, flags.length);
        }
        if (newModelHash == bytes32(0) || root == bytes32(0)) revert ZeroHash();
        for (uint256 i = 0; i < flaggedOrgs.length; ++i) {
            address org = flaggedOrgs[i];
            if (_commitments[roundId][org].updateHash == bytes32(0)) revert NotCommitted(roundId, org);
            _settlements[roundId][org].flags = flags[i];
            if (flags[i] != 0) emit OrganisationFlagged(roundId, org, flags[i]);
        }
        emit RewardsRootPosted(roundId, root);
        _close(roundId, newModelHash, valuation, totalReward, numOrganisations).rewardsRoot = root;
    }

    function _settle(uint256 roundId, address org, int256 score, uint256 reward, uint256 flags)
        private
        returns (uint256)
    {
        if (_commitments[roundId][org].updateHash == bytes32(0)) revert NotCommitted(roundId, org);
        Settlement storage settlement = _settlements[roundId][org];
        if (settlement.settled) revert DuplicateSettlement(roundId, org);
        settlement.score = score;
        settlement.reward = reward;
        settlement.flags = flags;
        settlement.settled = true;
        _totalRewards[org] += reward;
        emit ContributionRecorded(roundId, org, score, reward);
        if (flags != 0) emit OrganisationFlagged(roundId, org, flags);
        return reward;
    }

    function _requireOpen(uint256 roundId) private view {
        RoundState state = _rounds[roundId].state;
        if (state != RoundState.Open) revert RoundNotOpen(roundId, state);
    }

    function _close(
        uint256 roundId,
        bytes32 newModelHash,
        Valuation calldata valuation,
        uint256 totalReward,
        uint256 numOrganisations
    ) private returns (Round storage round) {
        if (totalReward > _roundBudget) revert RoundBudgetExceeded(roundId, totalReward, _roundBudget);
        round = _rounds[roundId];
        round.newModelHash = newModelHash;
        round.state = RoundState.Finalized;
        round.totalReward = totalReward;
        _valuations[roundId] = valuation;
        emit RoundValued(roundId, valuation.method, valuation.seed, valuation.validationHash);
        emit RoundFinalized(roundId, newModelHash, totalReward, numOrganisations);
    }

    // ----------------------------------------------------------- organisation

    /// @notice Commits the caller's model update for round `roundId`: its hash and sample count.
    /// @dev Registered organisations only, not retired; once per round; before the deadline.
    /// @param roundId The open round.
    /// @param updateHash keccak256 of the canonical bytes of the update the caller will upload.
    /// @param numSamples Number of local training samples behind the update (FedAvg weight).
    function commitUpdate(uint256 roundId, bytes32 updateHash, uint256 numSamples) external {
        _commit(roundId, updateHash, numSamples);
    }

    /// @notice Commits, as commitUpdate does, an update trained with differential privacy
    /// (DP-SGD), with the epsilon the caller has spent over all its rounds, this one included,
    /// at the task spec's delta: the privacy the update cost, on the record beside it.
    /// @param epsilon Epsilon spent so far, fixed point with 1e18 = 1.0; must not be zero.
    function commitPrivateUpdate(uint256 roundId, bytes32 updateHash, uint256 numSamples, uint256 epsilon)
        external
    {
        if (epsilon == 0) revert ZeroEpsilon();
        _commit(roundId, updateHash, numSamples);
        _epsilons[roundId][msg.sender] = epsilon;
        emit PrivacySpent(roundId, msg.sender, epsilon);
    }

    /// @notice Stops the caller training for good, e.g. when another round would take its
    /// epsilon past the privacy budget: the coordinator waits for it in no later round and
    /// reports it as retired, not missing. Commitments already made stand.
    /// @dev Registered organisations only; once (AlreadyRetired after).
    /// @param epsilon Epsilon spent, fixed point with 1e18 = 1.0 (0 where the task has no DP).
    function retire(uint256 epsilon) external {
        if (!hasRole(ORGANISATION_ROLE, msg.sender)) revert OrganisationNotRegistered(msg.sender);
        Retirement storage retirement = _retirements[msg.sender];
        if (retirement.retired) revert AlreadyRetired(msg.sender, retirement.sinceRound);
        retirement.retired = true;
        retirement.sinceRound = uint64(_roundCount);
        retirement.epsilon = epsilon;
        emit OrganisationRetired(msg.sender, _roundCount, epsilon);
    }

    function _commit(uint256 roundId, bytes32 updateHash, uint256 numSamples) private {
        if (!hasRole(ORGANISATION_ROLE, msg.sender)) revert OrganisationNotRegistered(msg.sender);
        Retirement storage retirement = _retirements[msg.sender];
        if (retirement.retired) revert AlreadyRetired(msg.sender, retirement.sinceRound);
        Round storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        if (block.timestamp > round.deadline) {
            revert CommitmentDeadlinePassed(roundId, round.deadline, block.timestamp);
        }
        if (updateHash == bytes32(0)) revert ZeroHash();
        if (numSamples == 0) revert ZeroSamples();
        uint256 cap = _sampleCaps[msg.sender];
        if (cap != 0 && numSamples > cap) revert SamplesAboveCap(msg.sender, numSamples, cap);
        Commitment storage commitment = _commitments[roundId][msg.sender];
        if (commitment.updateHash != bytes32(0)) {
            revert AlreadyCommitted(roundId, msg.sender, commitment.updateHash);
        }

        commitment.updateHash = updateHash;
        commitment.numSamples = numSamples;
        round.commitCount += 1;
        _committers[roundId].push(msg.sender);
        emit UpdateCommitted(roundId, msg.sender, updateHash, numSamples);
    }

    /// @notice Pays the caller its reward for round `roundId`, settled by a Merkle root, and
    /// records its score and flags as a direct settlement would.
    /// @dev Once per organisation and round; the caller must have committed in the round, and
    /// the leaf (roundId, caller, score, reward, flags) must be under the round's root.
    /// @param roundId A round finalized with finalizeRoundWithRoot.
    /// @param score The caller's contribution score in its leaf.
    /// @param reward The caller's reward in its leaf, in token units.
    /// @param flags The caller's flag bits in its leaf.
    /// @param proof The Merkle proof of the leaf (sibling hashes, leaf to root).
    function claimReward(
        uint256 roundId,
        int256 score,
        uint256 reward,
        uint256 flags,
        bytes32[] calldata proof
    ) external {
        Round storage round = _rounds[roundId];
        bytes32 root = round.rewardsRoot;
        if (root == bytes32(0)) revert NotClaimable(roundId);
        Settlement storage settlement = _settlements[roundId][msg.sender];
        if (settlement.settled) revert AlreadyClaimed(roundId, msg.sender);
        if (_commitments[roundId][msg.sender].updateHash == bytes32(0)) revert NotCommitted(roundId, msg.sender);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(roundId, msg.sender, score, reward, flags))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof(roundId, msg.sender);
        uint256 remaining = round.totalReward - round.claimedReward;
        if (reward > remaining) revert ClaimExceedsTotal(roundId, reward, remaining);

        round.claimedReward += reward;
        settlement.score = score;
        settlement.reward = reward;
        settlement.flags = flags;
        settlement.settled = true;
        _totalRewards[msg.sender] += reward;
        emit ContributionRecorded(roundId, msg.sender, score, reward);
        emit RewardClaimed(roundId, msg.sender, reward);
        if (reward != 0) _token.mint(msg.sender, reward);
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

    /// @notice `org`'s score in round `roundId`: its Shapley value, signed fixed point with 1e18 = 1.0.
    function scoreOf(uint256 roundId, address org) external view returns (int256) {
        return _settlements[roundId][org].score;
    }

    /// @notice Token units paid to `org` for round `roundId` (18 decimals: 1e18 = 1 token).
    function rewardOf(uint256 roundId, address org) external view returns (uint256) {
        return _settlements[roundId][org].reward;
    }

    /// @notice Token units paid to `org` over every round so far (direct settlements and
    /// claims): the sum of rewardOf(r, org) over r = 1..roundCount(), without the loop.
    function totalRewardOf(address org) external view returns (uint256) {
        return _totalRewards[org];
    }

    /// @notice The most one round may pay out in all, in token units (setRoundBudget).
    function roundBudget() external view returns (uint256) {
        return _roundBudget;
    }

    /// @notice keccak256 of the consortium's task spec file (zero until setTaskSpec).
    function taskSpec() external view returns (bytes32) {
        return _taskSpec;
    }

    /// @notice The most training samples `org` may declare in a commitment (0: no cap; setSampleCap).
    function sampleCapOf(address org) external view returns (uint256) {
        return _sampleCaps[org];
    }

    /// @notice The epsilon `org` reported with its commitment in round `roundId` (fixed point,
    /// 1e18 = 1.0; 0 for a commitment made without DP, or none).
    function epsilonOf(uint256 roundId, address org) external view returns (uint256) {
        return _epsilons[roundId][org];
    }

    /// @notice Whether, since when and having spent what epsilon `org` stopped training.
    function retirementOf(address org) external view returns (Retirement memory) {
        return _retirements[org];
    }

    /// @notice The flag bits the coordinator recorded for `org` in round `roundId` (0: none).
    /// @dev Bits: 1 norm_clipped, 2 zero_update, 4 duplicate_update, 8 copied_update,
    /// 16 negative_contribution, 32 unaligned_update; every one of them forfeits the round's
    /// reward (fedledger.incentive.onchain.Flag, docs/architecture.md).
    function flagsOf(uint256 roundId, address org) external view returns (uint256) {
        return _settlements[roundId][org].flags;
    }

    /// @notice How round `roundId`'s scores were computed (all zero until it is finalized).
    function valuationOf(uint256 roundId) external view returns (Valuation memory) {
        return _valuations[roundId];
    }

    /// @notice The organisations that committed in round `roundId`, in the order they committed
    /// (the coordinator's pricing treats the earlier of two copies as the original).
    function committersOf(uint256 roundId) external view returns (address[] memory) {
        return _committers[roundId];
    }

    /// @notice Whether `org` was scored in round `roundId`'s settlement (for a round settled by
    /// a Merkle root: whether `org` has claimed).
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
