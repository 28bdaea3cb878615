"""The one exception tree of crashcart; the CLI maps each class to one line and an exit code."""

from __future__ import annotations


class CrashcartError(Exception):
    """Root of every expected crashcart failure."""

    exit_code = 1


class InvalidInput(CrashcartError, ValueError):
    """Raised when a value given by a user or a file fails validation (before any side effect)."""

    exit_code = 2


class InvalidInventory(InvalidInput):
    """Raised when inventory.yaml, an Ansible inventory or the settings file is malformed."""


class UnknownHost(InvalidInput):
    """Raised when a host or group named by the user is not in the inventory."""


class InvalidRunbook(InvalidInput):
    """Raised when a runbook document fails validation."""


class InvalidScenario(InvalidInput):
    """Raised when a tabletop scenario document fails validation."""


class ConfirmationRefused(CrashcartError):
    """Raised when a production change was not confirmed by the operator."""

    exit_code = 3


class LockBusy(CrashcartError):
    """Raised when another run holds the per-host lock and waiting for it timed out."""

    exit_code = 4


class StepFailed(CrashcartError):
    """Raised when a runbook step failed and the runbook says to stop."""

    exit_code = 5


class RunFailed(CrashcartError):
    """Raised when a flow run ended in a failed final state (already recorded as evidence)."""

    exit_code = 5


class EvidenceError(CrashcartError):
    """Raised when the evidence ledger cannot be written or read."""

    exit_code = 6


class LabError(CrashcartError):
    """Raised when the staging lab cannot be started, inspected or stopped."""

    exit_code = 7


class IntegrationError(CrashcartError):
    """Raised when an outside system (host, Vault, restic, Slack, ...) fails."""

    exit_code = 10


class SSHError(IntegrationError):
    """Raised when a host cannot be reached or a command on it fails."""

    exit_code = 11


class HostUnreachable(SSHError):
    """Raised when the TCP connection or SSH banner does not arrive within its timeout."""


class HostKeyMismatch(SSHError):
    """Raised when a host presents a key other than the pinned one (possible MITM); nothing was sent."""

    exit_code = 12


class HostKeyUnknown(SSHError):
    """Raised when a host has no entry in the pinned known_hosts file."""

    exit_code = 12


class AuthRefused(SSHError):
    """Raised when the host refuses our credentials."""


class CommandTimedOut(SSHError):
    """Raised when a remote command runs longer than its timeout."""


class CommandFailed(SSHError):
    """Raised when a remote command exits non-zero; carries the exit code and (masked) stderr."""

    def __init__(self, message: str, *, exit_code: int, stderr: str = "") -> None:
        super().__init__(message)
        self.remote_exit_code = exit_code
        self.stderr = stderr


class FirewallError(IntegrationError):
    """Raised when firewalld is missing, not running or rejects a change."""


class VaultError(IntegrationError):
    """Raised when Vault/OpenBao refuses or fails a request."""

    exit_code = 13


class VaultUnavailable(VaultError):
    """Raised when Vault cannot be reached or is sealed."""


class VaultSecretMissing(VaultError):
    """Raised when a referenced secret path or key does not exist."""


class VaultConflict(VaultError):
    """Raised when a check-and-set write loses against a concurrent writer."""


class VaultPermissionDenied(VaultError):
    """Raised when Vault refuses the token (invalid, expired) or the policy does not allow the path."""


class VaultCertificateUnknown(VaultError):
    """Raised when the PKI mount has no certificate with the given serial (nothing was revoked)."""


class ResticError(IntegrationError):
    """Raised when restic fails; subclasses name the cause."""

    exit_code = 14


class ResticWrongPassword(ResticError):
    """Raised when the repository password is wrong."""


class ResticRepoMissing(ResticError):
    """Raised when the repository does not exist or is not a restic repository."""


class ResticLocked(ResticError):
    """Raised when the repository is locked by another (or a dead) restic process."""


class ResticTimedOut(ResticError):
    """Raised when restic runs longer than its timeout (it was stopped with SIGINT, then SIGKILL)."""


class ResticDataError(ResticError):
    """Raised when restic reports damaged or missing data."""


class ResticNotFound(ResticError):
    """Raised when the named snapshot, or a path inside it, is not in the repository."""


class ResticUnexpectedOutput(ResticError):
    """Raised when restic prints output the parser does not understand (an unsupported restic version?)."""


class LuksError(IntegrationError):
    """Raised when a cryptsetup operation fails or a keyslot rule would be broken."""

    exit_code = 15


class TLSError(IntegrationError):
    """Raised when a certificate cannot be issued, installed, served or revoked."""

    exit_code = 16


class SlackError(IntegrationError):
    """Raised when Slack refuses or fails a request."""

    exit_code = 17


class StateFileError(CrashcartError):
    """Raised when a state file of crashcart's (e.g. the restore-check rotation counter) is unreadable or malformed."""

    exit_code = 19


class InvalidDeployment(InvalidInput):
    """Raised when deploy/prefect.yaml is malformed or names a flow that cannot be loaded (before anything is registered)."""


class DeploymentError(IntegrationError):
    """Raised when the Prefect API refuses or fails to register a work pool, deployment or schedule."""

    exit_code = 18


class SlackNotConfigured(SlackError):
    """Raised when the settings name no Slack token or signing secret, or Vault cannot give it."""


class SlackUnavailable(SlackError):
    """Raised when Slack cannot be reached, does not answer within the timeout or answers a server error."""


class SlackRateLimited(SlackUnavailable):
    """Raised when Slack answers HTTP 429; `retry_after` says how many seconds it asked us to wait."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SlackAuthFailed(SlackError):
    """Raised when Slack refuses the bot token (invalid_auth, not_authed, token_revoked, ...)."""


class SlackRequestRejected(SlackError):
    """Raised when Slack refuses a request as malformed (invalid_blocks, channel_not_found, msg_too_long, ...)."""


class SlackUserRefused(SlackError):
    """Raised when a Slack user outside slack.approvers tries to trigger, approve or deny a run."""
