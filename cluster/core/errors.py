"""Error codes and typed errors.

Only OK, NODE and EVALUATION count in a node's buffer and error rate: the others are
failures of the bench itself, which must not be blamed on the node.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    OK = 0
    RELAY = 1
    NODE = 2
    OUT_OF_SESSION = 3
    BAD_PARAMS = 4
    PROMPT_NOT_FOUND = 5
    DATABASE_READ = 6
    RPC = 7
    SIGNER_NOT_FOUND = 8
    SIGNER_ERROR = 9
    TOKEN_SIGNATURE = 10
    EVALUATION = 11

    @property
    def counts_against_node(self) -> bool:
        return self in (ErrorCode.OK, ErrorCode.NODE, ErrorCode.EVALUATION)


class TestbenchError(Exception):
    """Base of every error testbench raises on purpose."""

    code: ErrorCode = ErrorCode.RELAY


class ConfigError(TestbenchError):
    code = ErrorCode.BAD_PARAMS


class DatasetError(TestbenchError):
    code = ErrorCode.DATABASE_READ


class TaskError(TestbenchError):
    code = ErrorCode.BAD_PARAMS


class NodeError(TestbenchError):
    code = ErrorCode.NODE


class RegistrationError(TestbenchError):
    code = ErrorCode.BAD_PARAMS


class EvaluationError(TestbenchError):
    code = ErrorCode.EVALUATION
