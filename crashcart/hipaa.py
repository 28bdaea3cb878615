"""The HIPAA Security Rule implementation specifications crashcart's runbooks may declare."""

from __future__ import annotations

from crashcart.errors import InvalidInput

SPECIFICATIONS: dict[str, str] = {
    "164.308(a)(1)(ii)(D)": "Information system activity review",
    "164.308(a)(5)(ii)(D)": "Password management",
    "164.308(a)(6)(i)": "Security incident procedures",
    "164.308(a)(6)(ii)": "Response and reporting",
    "164.308(a)(7)(i)": "Contingency plan",
    "164.308(a)(7)(ii)(A)": "Data backup plan",
    "164.308(a)(7)(ii)(B)": "Disaster recovery plan",
    "164.308(a)(7)(ii)(C)": "Emergency mode operation plan",
    "164.308(a)(7)(ii)(D)": "Testing and revision procedures",
    "164.312(a)(2)(iv)": "Encryption and decryption (at rest)",
    "164.312(b)": "Audit controls",
    "164.312(c)(1)": "Integrity",
    "164.312(d)": "Person or entity authentication",
    "164.312(e)(2)(ii)": "Encryption (in transmission)",
    "164.316(b)(2)(i)": "Documentation retention (six years)",
}

# What an auditor expects to see at least once per period, per specification (gap detection).
EXPECTED_CADENCE_DAYS: dict[str, int] = {
    "164.308(a)(7)(ii)(D)": 92,  # a restore test every quarter
    "164.308(a)(6)(ii)": 366,    # an exercised or real incident response every year
}


def check_spec(value: str) -> str:
    """A known specification id such as 164.308(a)(6)(ii)."""
    if value not in SPECIFICATIONS:
        raise InvalidInput(f"unknown HIPAA specification {value!r} (known: {', '.join(SPECIFICATIONS)})")
    return value
