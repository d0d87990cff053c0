"""Errors of the device simulator: one root, one subclass per thing that can be wrong."""

from __future__ import annotations


class SimError(Exception):
    """Anything that stops the simulator; the message is meant for the engineer running it."""


class ScenarioError(SimError):
    """A scenario file that cannot be read or does not follow the schema (file and field)."""


class FleetError(SimError):
    """A census or credentials file that cannot be used (file, line and column)."""


class BrokerError(SimError):
    """The simulated devices could not connect to, or publish through, the broker."""


class ProbeError(SimError):
    """The service under test could not be observed (not running, not ready, bad answer)."""


class RegistrationError(SimError):
    """The fleet could not be written into the service's registry (`--register`)."""
