"""The control plane's exceptions.

ControlPlaneError          anything the control plane refuses or cannot do
├── ConfigError            bad settings or targets file (names the key); fails start-up
├── NotFound               an incident, action or silence that does not exist (404)
├── Conflict               a state change that lost its compare-and-set (409)
├── InvalidRequest         a request the API cannot accept (400)
├── TooLarge               a request body beyond the size limit (413)
└── UnsupportedMediaType   a request body that is not application/json (415)
"""

from __future__ import annotations


class ControlPlaneError(Exception):
    status = 500


class ConfigError(ControlPlaneError):
    pass


class NotFound(ControlPlaneError):
    status = 404


class Conflict(ControlPlaneError):
    status = 409


class InvalidRequest(ControlPlaneError):
    status = 400


class TooLarge(ControlPlaneError):
    status = 413


class UnsupportedMediaType(ControlPlaneError):
    status = 415
