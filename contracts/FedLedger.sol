// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {AccessControl, IAccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {AccessControlDefaultAdminRules} from "@openzeppelin/contracts/access/extensions/AccessControlDefaultAdminRules.sol";
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
contract FedLedger is AccessControlDefaultAdminRules, AccessControlEnumerable {
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

    /// @notice An organisation that has stopped training for good, e.g. because another round
    /// would take its differential-privacy epsilon past the consortium's budget.
    struct Retirement {
        bool retired;
        uint64 sinceRound; // roundCount() when it retired: it commits in no round from then on
        uint256 epsilon; // epsilon it had spent, fixed point 1e18 = 1.0 (0: not a DP task)
    }

    /// @notice The delay a change of admin waits out (AccessControlDefaultAdminRules): the
    /// admin proposes a successor, who accepts no earlier than this after the proposal, so a
    /// leaked or mistyped transfer can be seen and cancelled. The admin may change the delay
    /// itself, which also waits (changeDefaultAdminDelay).
    uint48 public constant INITIAL_ADMIN_DELAY = 1 days;

    /// @dev One round's record in three slots: the two model hashes, then deadline, state,
    /// commit count and total reward, then the Merkle root; a fourth slot holds what claims
    /// paid. A direct settlement pays everything at once and never writes the fourth.
    struct RoundRecord {
        bytes32 modelHash;
        bytes32 newModelHash;
        uint64 deadline;
        RoundState state;
        uint32 commitCount;
        uint128 totalReward;
        bytes32 rewardsRoot;
        uint128 claimedReward;
    }

    /// @dev An organisation's part in one round, in two slots: the committed update hash, then
    /// the sample count, the commit order (1 for the first committer, 0 for none), score,
    /// reward, flags and whether it was settled. A commitment writes both slots fresh; a
    /// settlement rewrites the second only.
    struct Entry {
        bytes32 updateHash;
        uint40 numSamples;
        uint16 order;
        int96 score;
        uint88 reward;
        uint8 flags;
        bool settled;
    }

    /// @dev What a commitment checks of its sender, in one slot: membership (mirroring the
    /// organisation role, which only registerOrganisation and revokeOrganisation change),
    /// retirement, and the sample cap.
    struct Member {
        bool listed; // in _members (ever registered)
        bool registered;
        bool retired;
        uint40 sampleCap;
        uint64 sinceRound;
        uint128 epsilon;
    }

    RewardToken private immutable _token;
    uint256 private _roundCount;
    mapping(uint256 roundId => RoundRecord) private _rounds;
    mapping(uint256 roundId => mapping(address org => Entry)) private _entries;
    mapping(uint256 roundId => Valuation) private _valuations;
    uint256 private _roundBudget;
    bytes32 private _taskSpec;
    mapping(uint256 roundId => mapping(address org => uint256 epsilon)) private _epsilons;
    mapping(address org => Member) private _memberOf;
    address[] private _members;
    uint256 private _activeOrganisations;
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

    /// @notice The organisation role changes only through registerOrganisation and
    /// revokeOrganisation (which keep the membership record and emit their events), and a
    /// member leaves by retire(), not renounceRole.
    error OrganisationRoleManaged();
    /// @notice `account` cannot hold both the coordinator and the organisation role: the
    /// coordinator would score and pay itself.
    error CoordinatorCannotBeOrganisation(address account);
    /// @notice Round `roundId` still takes commitments: until `deadline` or until every one
    /// of the `active` organisations committed (`commitCount` so far).
    error CommitPhaseOpen(uint256 roundId, uint64 deadline, uint256 commitCount, uint256 active);
    /// @notice Flagged organisations are announced in ascending address order, each once:
    /// `org` (position `index`) does not come after the one before it.
    error FlaggedNotAscending(uint256 index, address org);
    /// @notice `org` is announced as flagged with flags `flags`: announced flags are a nonzero bit
    /// set below 256.
    error FlagsOutOfRange(address org, uint256 flags);
    /// @notice `org`'s claim in round `roundId` carries flags `claimed`, not the `announced` ones.
    error FlagsMismatch(uint256 roundId, address org, uint256 announced, uint256 claimed);
    /// @notice `value` is above `max`, the most the ledger stores for `field` (ASCII, left-aligned).
    error ValueOutOfRange(bytes32 field, uint256 value, uint256 max);
    /// @notice `score` lies outside the range the ledger stores (a signed 96-bit fixed point).
    error ScoreOutOfRange(address org, int256 score);
    /// @notice Round `roundId` already has the most commitments one round can hold (`max`).
    error TooManyCommitments(uint256 roundId, uint256 max);

    /// @notice The admin registered `org` as a consortium organisation.
    event OrganisationRegistered(address indexed org);
    /// @notice The admin revoked `org`'s membership: it commits in no round from now on.
    event OrganisationRevoked(address indexed org);
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

    /// @param admin The consortium admin: registers organisations and manages roles. The
    /// admin role moves in two steps with INITIAL_ADMIN_DELAY between them.
    /// @param coordinator The account of the coordinator service.
    /// @param tokenName Name of the reward token this ledger deploys and alone mints.
    /// @param tokenSymbol Symbol of the reward token.
    constructor(address admin, address coordinator, string memory tokenName, string memory tokenSymbol)
        AccessControlDefaultAdminRules(INITIAL_ADMIN_DELAY, admin)
    {
        if (coordinator == address(0)) revert ZeroAddress();
        _grantRole(COORDINATOR_ROLE, coordinator);
        _token = new RewardToken(tokenName, tokenSymbol);
    }

    // ------------------------------------------------------------------ roles

    /// @inheritdoc AccessControlDefaultAdminRules
    function supportsInterface(bytes4 interfaceId)
        public
        view
        override(AccessControlDefaultAdminRules, AccessControlEnumerable)
        returns (bool)
    {
        return super.supportsInterface(interfaceId);
    }

    /// @notice Grants `role` to `account`, as AccessControl does, except the organisation role
    /// (OrganisationRoleManaged: use registerOrganisation) and the admin role (two steps).
    function grantRole(bytes32 role, address account)
        public
        override(AccessControl, AccessControlDefaultAdminRules, IAccessControl)
    {
        if (role == ORGANISATION_ROLE) revert OrganisationRoleManaged();
        super.grantRole(role, account);
    }

    /// @notice Revokes `role` from `account`, as AccessControl does, except the organisation
    /// role (OrganisationRoleManaged: use revokeOrganisation).
    function revokeRole(bytes32 role, address account)
        public
        override(AccessControl, AccessControlDefaultAdminRules, IAccessControl)
    {
        if (role == ORGANISATION_ROLE) revert OrganisationRoleManaged();
        super.revokeRole(role, account);
    }

    /// @notice Renounces `role`, as AccessControl does, except the organisation role
    /// (OrganisationRoleManaged: a member leaves by retire()).
    function renounceRole(bytes32 role, address account)
        public
        override(AccessControl, AccessControlDefaultAdminRules, IAccessControl)
    {
        if (role == ORGANISATION_ROLE) revert OrganisationRoleManaged();
        super.renounceRole(role, account);
    }

    function _grantRole(bytes32 role, address account)
        internal
        override(AccessControlDefaultAdminRules, AccessControlEnumerable)
        returns (bool)
    {
        if (
            (role == COORDINATOR_ROLE && hasRole(ORGANISATION_ROLE, account))
                || (role == ORGANISATION_ROLE && hasRole(COORDINATOR_ROLE, account))
        ) revert CoordinatorCannotBeOrganisation(account);
        return super._grantRole(role, account);
    }

    function _revokeRole(bytes32 role, address account)
        internal
        override(AccessControlDefaultAdminRules, AccessControlEnumerable)
        returns (bool)
    {
        return super._revokeRole(role, account);
    }

    function _setRoleAdmin(bytes32 role, bytes32 adminRole)
        internal
        override(AccessControl, AccessControlDefaultAdminRules)
    {
        super._setRoleAdmin(role, adminRole);
    }

    // ------------------------------------------------------------------ admin

    /// @notice Registers `org` as an organisation that may commit updates and be paid.
    /// @dev Admin only. Reverts with OrganisationAlreadyRegistered for a member and with
    /// CoordinatorCannotBeOrganisation for the coordinator. A revoked organisation may be
    /// registered again; a retired one stays retired.
    /// @param org The organisation's Ethereum account.
    function registerOrganisation(address org) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (org == address(0)) revert ZeroAddress();
        if (!_grantRole(ORGANISATION_ROLE, org)) revert OrganisationAlreadyRegistered(org);
        Member storage member = _memberOf[org];
        if (!member.listed) {
            member.listed = true;
            _members.push(org);
        }
        member.registered = true;
        if (!member.retired) _activeOrganisations += 1;
        emit OrganisationRegistered(org);
    }

    /// @notice Revokes `org`'s membership: it commits in no round from now on. Its commitments,
    /// scores and rewards so far stand, and a round it committed in still settles it.
    /// @dev Admin only. Reverts with OrganisationNotRegistered for an account that is not one.
    /// @param org The organisation's Ethereum account.
    function revokeOrganisation(address org) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (!_revokeRole(ORGANISATION_ROLE, org)) revert OrganisationNotRegistered(org);
        Member storage member = _memberOf[org];
        member.registered = false;
        if (!member.retired) _activeOrganisations -= 1;
        emit OrganisationRevoked(org);
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
    /// @dev Admin only. Applies to commitments made from now on. At most 2^40 - 1.
    function setSampleCap(address org, uint256 cap) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (!hasRole(ORGANISATION_ROLE, org)) revert OrganisationNotRegistered(org);
        if (cap > type(uint40).max) revert ValueOutOfRange("sampleCap", cap, type(uint40).max);
        Member storage member = _memberOf[org];
        uint256 previous = member.sampleCap;
        member.sampleCap = uint40(cap);
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
        RoundRecord storage round = _rounds[roundId];
        round.modelHash = modelHash;
        round.deadline = deadline;
        round.state = RoundState.Open;
        emit RoundOpened(roundId, modelHash, deadline);
    }

    /// @notice Gives the organisations until `deadline` to commit to round `roundId`.
    /// @dev Coordinator only; the round must be open, its commit phase not yet over
    /// (CommitmentDeadlinePassed: no extension once anyone may have seen an upload), and the
    /// new deadline later than the old one (used when a round would miss its quorum and the
    /// policy says extend).
    /// @param roundId The open round.
    /// @param deadline The new deadline, unix seconds.
    function extendRound(uint256 roundId, uint64 deadline) external onlyRole(COORDINATOR_ROLE) {
        RoundRecord storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        uint64 previous = round.deadline;
        if (block.timestamp > previous) revert CommitmentDeadlinePassed(roundId, previous, block.timestamp);
        if (deadline <= previous) revert DeadlineNotLater(previous, deadline);
        round.deadline = deadline;
        emit RoundExtended(roundId, previous, deadline);
    }

    /// @notice Closes round `roundId`: records the new global model, how it was valued, each
    /// organisation's contribution score, reward and flags, and mints the rewards.
    /// @dev Coordinator only; once per round; only once its commit phase is over
    /// (CommitPhaseOpen: past the deadline, or every active organisation committed). Every
    /// listed organisation must have committed in the round and appear once. Empty arrays
    /// close a round without payouts. Stored ranges: score a signed 96-bit, reward below
    /// 2^88, flags below 256, the round's total below 2^128.
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
        _requireCommitsClosed(roundId);
        if (orgs.length != scores.length || orgs.length != rewards.length || orgs.length != flags.length) {
            revert LengthMismatch(orgs.length, scores.length, rewards.length, flags.length);
        }
        if (newModelHash == bytes32(0)) revert ZeroHash();

        uint256 total;
        for (uint256 i = 0; i < orgs.length; ++i) {
            total += _settle(roundId, orgs[i], scores[i], rewards[i], flags[i]);
        }
        _close(roundId, newModelHash, valuation, total, orgs.length);

        for (uint256 i = 0; i < orgs.length; ++i) {
            if (rewards[i] != 0) _token.mint(orgs[i], rewards[i]);
        }
    }

    /// @notice Closes round `roundId` with one Merkle root of its settlement: each organisation
    /// then claims its own reward with a proof (claimReward). The coordinator's cost does not
    /// grow with the number of organisations paid, only with the number it flags.
    /// @dev Coordinator only; once per round; only once its commit phase is over
    /// (CommitPhaseOpen). Leaves are OpenZeppelin StandardMerkleTree leaves,
    /// keccak256(bytes.concat(keccak256(abi.encode(roundId, org, score, reward, flags)))).
    /// @param roundId The open round.
    /// @param newModelHash keccak256 of the canonical bytes of the aggregated model.
    /// @param valuation The valuation method, its seed and the validation set's hash.
    /// @param root Merkle root of the round's settlement leaves (one per scored organisation).
    /// @param totalReward Sum of the leaves' rewards: claims never pay out more.
    /// @param numOrganisations Number of leaves under the root.
    /// @param flaggedOrgs Organisations the coordinator flagged, announced now in ascending
    /// address order, each once; every one must have committed in the round, and its claim
    /// must carry the same flags (FlagsMismatch). Unlisted organisations claim with flags 0.
    /// @param flags The flag bits of each of `flaggedOrgs`: nonzero and below 256.
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
        _requireCommitsClosed(roundId);
        if (flaggedOrgs.length != flags.length) {
            revert LengthMismatch(flaggedOrgs.length, flags.length, flags.length, flags.length);
        }
        if (newModelHash == bytes32(0) || root == bytes32(0)) revert ZeroHash();
        _announceFlags(roundId, flaggedOrgs, flags);
        emit RewardsRootPosted(roundId, root);
        _close(roundId, newModelHash, valuation, totalReward, numOrganisations).rewardsRoot = root;
    }

    function _announceFlags(uint256 roundId, address[] calldata flaggedOrgs, uint256[] calldata flags) private {
        address previous = address(0);
        for (uint256 i = 0; i < flaggedOrgs.length; ++i) {
            address org = flaggedOrgs[i];
            if (org <= previous) revert FlaggedNotAscending(i, org);
            previous = org;
            if (flags[i] == 0 || flags[i] > type(uint8).max) revert FlagsOutOfRange(org, flags[i]);
            Entry storage entry = _entries[roundId][org];
            if (entry.updateHash == bytes32(0)) revert NotCommitted(roundId, org);
            entry.flags = uint8(flags[i]);
            emit OrganisationFlagged(roundId, org, flags[i]);
        }
    }

    function _settle(uint256 roundId, address org, int256 score, uint256 reward, uint256 flags)
        private
        returns (uint256)
    {
        Entry storage entry = _entries[roundId][org];
        if (entry.updateHash == bytes32(0)) revert NotCommitted(roundId, org);
        if (entry.settled) revert DuplicateSettlement(roundId, org);
        _record(entry, org, score, reward, flags);
        emit ContributionRecorded(roundId, org, score, reward);
        if (flags != 0) emit OrganisationFlagged(roundId, org, flags);
        return reward;
    }

    function _record(Entry storage entry, address org, int256 score, uint256 reward, uint256 flags) private {
        if (score < type(int96).min || score > type(int96).max) revert ScoreOutOfRange(org, score);
        if (reward > type(uint88).max) revert ValueOutOfRange("reward", reward, type(uint88).max);
        if (flags > type(uint8).max) revert FlagsOutOfRange(org, flags);
        entry.score = int96(score);
        entry.reward = uint88(reward);
        entry.flags = uint8(flags);
        entry.settled = true;
        if (reward != 0) _totalRewards[org] += reward;
    }

    function _requireCommitsClosed(uint256 roundId) private view {
        RoundRecord storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        if (block.timestamp <= round.deadline && round.commitCount < _activeOrganisations) {
            revert CommitPhaseOpen(roundId, round.deadline, round.commitCount, _activeOrganisations);
        }
    }

    function _close(
        uint256 roundId,
        bytes32 newModelHash,
        Valuation calldata valuation,
        uint256 totalReward,
        uint256 numOrganisations
    ) private returns (RoundRecord storage round) {
        if (totalReward > _roundBudget) revert RoundBudgetExceeded(roundId, totalReward, _roundBudget);
        if (totalReward > type(uint128).max) revert ValueOutOfRange("totalReward", totalReward, type(uint128).max);
        round = _rounds[roundId];
        round.newModelHash = newModelHash;
        round.state = RoundState.Finalized;
        round.totalReward = uint128(totalReward);
        _valuations[roundId] = valuation;
        emit RoundValued(roundId, valuation.method, valuation.seed, valuation.validationHash);
        emit RoundFinalized(roundId, newModelHash, totalReward, numOrganisations);
    }

    // ----------------------------------------------------------- organisation

    /// @notice Commits the caller's model update for round `roundId`: its hash and sample count.
    /// @dev Registered organisations only, not retired; once per round; before the deadline.
    /// @param roundId The open round.
    /// @param updateHash keccak256 of the canonical bytes of the update the caller will upload.
    /// @param numSamples Number of local training samples behind the update (FedAvg weight),
    /// at most 2^40 - 1 and at most the caller's sample cap.
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
    /// @param epsilon Epsilon spent, fixed point with 1e18 = 1.0 (0 where the task has no DP),
    /// below 2^128.
    function retire(uint256 epsilon) external {
        Member storage member = _memberOf[msg.sender];
        if (!member.registered) revert OrganisationNotRegistered(msg.sender);
        if (member.retired) revert AlreadyRetired(msg.sender, member.sinceRound);
        if (epsilon > type(uint128).max) revert ValueOutOfRange("epsilon", epsilon, type(uint128).max);
        member.retired = true;
        member.sinceRound = uint64(_roundCount);
        member.epsilon = uint128(epsilon);
        _activeOrganisations -= 1;
        emit OrganisationRetired(msg.sender, _roundCount, epsilon);
    }

    function _commit(uint256 roundId, bytes32 updateHash, uint256 numSamples) private {
        Member storage member = _memberOf[msg.sender];
        if (!member.registered) revert OrganisationNotRegistered(msg.sender);
        if (member.retired) revert AlreadyRetired(msg.sender, member.sinceRound);
        RoundRecord storage round = _rounds[roundId];
        if (round.state != RoundState.Open) revert RoundNotOpen(roundId, round.state);
        if (block.timestamp > round.deadline) {
            revert CommitmentDeadlinePassed(roundId, round.deadline, block.timestamp);
        }
        if (updateHash == bytes32(0)) revert ZeroHash();
        if (numSamples == 0) revert ZeroSamples();
        uint256 cap = member.sampleCap;
        if (cap != 0 && numSamples > cap) revert SamplesAboveCap(msg.sender, numSamples, cap);
        if (numSamples > type(uint40).max) revert ValueOutOfRange("numSamples", numSamples, type(uint40).max);
        Entry storage entry = _entries[roundId][msg.sender];
        if (entry.updateHash != bytes32(0)) revert AlreadyCommitted(roundId, msg.sender, entry.updateHash);
        uint32 order = round.commitCount + 1;
        if (order > type(uint16).max) revert TooManyCommitments(roundId, type(uint16).max);

        entry.updateHash = updateHash;
        entry.numSamples = uint40(numSamples);
        entry.order = uint16(order);
        round.commitCount = order;
        emit UpdateCommitted(roundId, msg.sender, updateHash, numSamples);
    }

    /// @notice Pays the caller its reward for round `roundId`, settled by a Merkle root, and
    /// records its score and flags as a direct settlement would.
    /// @dev Once per organisation and round; the caller must have committed in the round, the
    /// leaf (roundId, caller, score, reward, flags) must be under the round's root, and the
    /// flags must be those announced at finalization (0 for an organisation not announced).
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
        RoundRecord storage round = _rounds[roundId];
        bytes32 root = round.rewardsRoot;
        if (root == bytes32(0)) revert NotClaimable(roundId);
        Entry storage entry = _entries[roundId][msg.sender];
        if (entry.settled) revert AlreadyClaimed(roundId, msg.sender);
        if (entry.updateHash == bytes32(0)) revert NotCommitted(roundId, msg.sender);
        if (flags != entry.flags) revert FlagsMismatch(roundId, msg.sender, entry.flags, flags);
        bytes32 leaf = keccak256(bytes.concat(keccak256(abi.encode(roundId, msg.sender, score, reward, flags))));
        if (!MerkleProof.verifyCalldata(proof, root, leaf)) revert InvalidProof(roundId, msg.sender);
        uint256 remaining = round.totalReward - round.claimedReward;
        if (reward > remaining) revert ClaimExceedsTotal(roundId, reward, remaining);

        round.claimedReward += uint128(reward);
        _record(entry, msg.sender, score, reward, flags);
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
        RoundRecord storage round = _rounds[roundId];
        bool direct = round.rewardsRoot == bytes32(0) && round.state == RoundState.Finalized;
        return Round({
            modelHash: round.modelHash,
            newModelHash: round.newModelHash,
            deadline: round.deadline,
            state: round.state,
            commitCount: round.commitCount,
            totalReward: round.totalReward,
            rewardsRoot: round.rewardsRoot,
            claimedReward: direct ? round.totalReward : round.claimedReward
        });
    }

    /// @notice Whether round `roundId`'s commit phase is over: it is open and past its
    /// deadline, or every active organisation committed. Uploads, and the round's
    /// finalization, wait for it.
    function commitsClosed(uint256 roundId) external view returns (bool) {
        RoundRecord storage round = _rounds[roundId];
        return round.state == RoundState.Open
            && (block.timestamp > round.deadline || round.commitCount >= _activeOrganisations);
    }

    /// @notice The number of registered organisations that have not retired: the commitments
    /// that close a round's commit phase before its deadline.
    function activeOrganisations() external view returns (uint256) {
        return _activeOrganisations;
    }

    /// @notice What `org` committed in round `roundId` (zero hash if nothing).
    function commitmentOf(uint256 roundId, address org) external view returns (bytes32 updateHash, uint256 numSamples) {
        Entry storage entry = _entries[roundId][org];
        return (entry.updateHash, entry.numSamples);
    }

    /// @notice `org`'s score in round `roundId`: its Shapley value, signed fixed point with 1e18 = 1.0.
    function scoreOf(uint256 roundId, address org) external view returns (int256) {
        return _entries[roundId][org].score;
    }

    /// @notice Token units paid to `org` for round `roundId` (18 decimals: 1e18 = 1 token).
    function rewardOf(uint256 roundId, address org) external view returns (uint256) {
        return _entries[roundId][org].reward;
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
        return _memberOf[org].sampleCap;
    }

    /// @notice The epsilon `org` reported with its commitment in round `roundId` (fixed point,
    /// 1e18 = 1.0; 0 for a commitment made without DP, or none).
    function epsilonOf(uint256 roundId, address org) external view returns (uint256) {
        return _epsilons[roundId][org];
    }

    /// @notice Whether, since when and having spent what epsilon `org` stopped training.
    function retirementOf(address org) external view returns (Retirement memory) {
        Member storage member = _memberOf[org];
        return Retirement({retired: member.retired, sinceRound: member.sinceRound, epsilon: member.epsilon});
    }

    /// @notice The flag bits the coordinator recorded for `org` in round `roundId` (0: none).
    /// @dev Bits: 1 norm_clipped, 2 zero_update, 4 duplicate_update, 8 copied_update,
    /// 16 negative_contribution, 32 unaligned_update; every one of them forfeits the round's
    /// reward (fedledger.incentive.onchain.Flag, docs/architecture.md).
    function flagsOf(uint256 roundId, address org) external view returns (uint256) {
        return _entries[roundId][org].flags;
    }

    /// @notice How round `roundId`'s scores were computed (all zero until it is finalized).
    function valuationOf(uint256 roundId) external view returns (Valuation memory) {
        return _valuations[roundId];
    }

    /// @notice The organisations that committed in round `roundId`, in the order they committed
    /// (the coordinator's pricing treats the earlier of two copies as the original).
    /// @dev Derived from each member's commit order, so a commitment writes no array; the
    /// call reads one slot per organisation ever registered.
    function committersOf(uint256 roundId) external view returns (address[] memory committers) {
        committers = new address[](_rounds[roundId].commitCount);
        mapping(address org => Entry) storage entries = _entries[roundId];
        for (uint256 i = 0; i < _members.length; ++i) {
            uint256 order = entries[_members[i]].order;
            if (order != 0) committers[order - 1] = _members[i];
        }
    }

    /// @notice Whether `org` was scored in round `roundId`'s settlement (for a round settled by
    /// a Merkle root: whether `org` has claimed).
    function isSettled(uint256 roundId, address org) external view returns (bool) {
        return _entries[roundId][org].settled;
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
