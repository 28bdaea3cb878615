"""The tamper-evident evidence ledger: append, checkpoint, read, verify and prune."""

from crashcart.evidence.ledger import GENESIS, Ledger, Record, iter_records, prune
from crashcart.evidence.signing import LocalEd25519Signer, Signer, TrustedKey, TrustedKeys, pin_key
from crashcart.evidence.verify import EXIT_CODES, Status, VerifyReport, verify

__all__ = [
    "EXIT_CODES",
    "GENESIS",
    "Ledger",
    "LocalEd25519Signer",
    "Record",
    "Signer",
    "Status",
    "TrustedKey",
    "TrustedKeys",
    "VerifyReport",
    "iter_records",
    "pin_key",
    "prune",
    "verify",
]
