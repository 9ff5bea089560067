"""The lab's exceptions.

LabError                 anything the lab cannot do, with a message saying why and what to do
├── MissingBinaryError   a server binary is not installed (names the apt package)
├── PortInUseError       a port the stack needs is taken
└── NotReadyError        a server did not become ready before its deadline
"""

from __future__ import annotations


class LabError(Exception):
    """Something the lab cannot do; the message says why."""


class MissingBinaryError(LabError):
    pass


class PortInUseError(LabError):
    pass


class NotReadyError(LabError):
    pass
