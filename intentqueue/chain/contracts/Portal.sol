// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title Portal
/// @notice Cross-chain intent portal, deployed on both chains. On the source chain a creator
/// publishes an intent and escrows its reward; on the destination chain a solver fulfills the
/// route by supplying the route's tokens and running its calls, recording who may claim the
/// reward. Proving and reward withdrawal are not part of this contract.
contract Portal {
    struct TokenAmount {
        address token;
        uint256 amount;
    }

    struct Call {
        address target;
        bytes data;
        uint256 value;
    }

    struct Route {
        bytes32 salt;
        uint64 deadline;
        address portal;
        uint256 nativeAmount;
        TokenAmount[] tokens;
        Call[] calls;
    }

    struct Reward {
        uint64 deadline;
        address creator;
        address prover;
        uint256 nativeAmount;
        TokenAmount[] tokens;
    }

    uint8 internal constant STATUS_NONE = 0;
    uint8 internal constant STATUS_FUNDED = 1;

    /// @notice Source side: reward status of an intent (0 none, 1 funded).
    mapping(bytes32 => uint8) public rewardStatus;

    /// @notice Destination side: the claimant recorded for a fulfilled intent, zero if unfulfilled.
    mapping(bytes32 => bytes32) public fulfilled;

    event IntentPublished(
        bytes32 indexed intentHash,
        uint64 destination,
        address indexed creator,
        address indexed prover,
        uint64 rewardDeadline
    );
    event IntentFunded(bytes32 indexed intentHash, address funder);
    event IntentFulfilled(bytes32 indexed intentHash, bytes32 indexed claimant);

    error IntentAlreadyExists(bytes32 intentHash);
    error IntentAlreadyFulfilled(bytes32 intentHash);
    error InvalidPortal(address portal);
    error IntentExpired();
    error InvalidHash(bytes32 expected);
    error ZeroClaimant();
    error InsufficientNativeAmount();
    error CallFailed(uint256 index, bytes returnData);
    error TransferFailed(address token, address from, uint256 amount);

    /// @notice The hashes identifying an intent.
    /// @param destination Chain id of the destination chain.
    /// @return intentHash keccak256(abi.encodePacked(destination, routeHash, rewardHash)).
    /// @return routeHash keccak256(abi.encode(route)).
    /// @return rewardHash keccak256(abi.encode(reward)).
    function getIntentHash(uint64 destination, Route calldata route, Reward calldata reward)
        external
        pure
        returns (bytes32 intentHash, bytes32 routeHash, bytes32 rewardHash)
    {
        routeHash = keccak256(abi.encode(route));
        rewardHash = keccak256(abi.encode(reward));
        intentHash = keccak256(abi.encodePacked(destination, routeHash, rewardHash));
    }

    /// @notice Source side: publish an intent and escrow its reward in this portal.
    /// @dev msg.value must equal reward.nativeAmount; each reward token is pulled from the
    /// caller with transferFrom, so the caller approves this portal first.
    /// @param destination Chain id of the destination chain.
    /// @return intentHash The hash of the published intent.
    function publishAndFund(uint64 destination, Route calldata route, Reward calldata reward)
        external
        payable
        returns (bytes32 intentHash)
    {
        intentHash = keccak256(
            abi.encodePacked(destination, keccak256(abi.encode(route)), keccak256(abi.encode(reward)))
        );
        if (rewardStatus[intentHash] != STATUS_NONE) revert IntentAlreadyExists(intentHash);
        if (msg.value != reward.nativeAmount) revert InsufficientNativeAmount();

        rewardStatus[intentHash] = STATUS_FUNDED;
        for (uint256 i = 0; i < reward.tokens.length; ++i) {
            _pullToken(reward.tokens[i].token, msg.sender, reward.tokens[i].amount);
        }

        emit IntentPublished(intentHash, destination, reward.creator, reward.prover, reward.deadline);
        emit IntentFunded(intentHash, msg.sender);
    }

    /// @notice Source side: whether the reward of `intentHash` is escrowed here.
    function isIntentFunded(bytes32 intentHash) external view returns (bool) {
        return rewardStatus[intentHash] == STATUS_FUNDED;
    }

    /// @notice Destination side: fulfill an intent's route and record the reward's claimant.
    /// @dev The route's tokens are pulled from the caller with transferFrom (approve this portal
    /// first), then each call runs from this portal, typically an ERC-20 transfer out of the
    /// tokens just pulled. msg.value must equal route.nativeAmount.
    /// @param intentHash The intent hash, checked against route and rewardHash on this chain id.
    /// @param rewardHash keccak256(abi.encode(reward)) of the intent's reward.
    /// @param claimant Who may claim the reward on the source chain; must not be zero.
    /// @return results The return data of each call.
    function fulfill(bytes32 intentHash, Route calldata route, bytes32 rewardHash, bytes32 claimant)
        external
        payable
        returns (bytes[] memory results)
    {
        if (route.portal != address(this)) revert InvalidPortal(route.portal);
        if (block.timestamp > route.deadline) revert IntentExpired();
        bytes32 expected = keccak256(
            abi.encodePacked(uint64(block.chainid), keccak256(abi.encode(route)), rewardHash)
        );
        if (expected != intentHash) revert InvalidHash(expected);
        if (fulfilled[intentHash] != bytes32(0)) revert IntentAlreadyFulfilled(intentHash);
        if (claimant == bytes32(0)) revert ZeroClaimant();
        if (msg.value != route.nativeAmount) revert InsufficientNativeAmount();

        // Recorded before any external call, so a reentrant fulfill of the same intent fails.
        fulfilled[intentHash] = claimant;

        for (uint256 i = 0; i < route.tokens.length; ++i) {
            _pullToken(route.tokens[i].token, msg.sender, route.tokens[i].amount);
        }

        results = new bytes[](route.calls.length);
        for (uint256 i = 0; i < route.calls.length; ++i) {
            Call calldata c = route.calls[i];
            (bool ok, bytes memory returnData) = c.target.call{value: c.value}(c.data);
            if (!ok) revert CallFailed(i, returnData);
            results[i] = returnData;
        }

        emit IntentFulfilled(intentHash, claimant);
    }

    /// @dev transferFrom(from, this, amount), accepting tokens that return nothing.
    function _pullToken(address token, address from, uint256 amount) private {
        (bool ok, bytes memory ret) = token.call(
            abi.encodeWithSignature("transferFrom(address,address,uint256)", from, address(this), amount)
        );
        if (!ok || (ret.length != 0 && !abi.decode(ret, (bool))) || token.code.length == 0) {
            revert TransferFailed(token, from, amount);
        }
    }
}
