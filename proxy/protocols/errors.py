"""Errors raised by the sans-IO protocol machines.

The h11 split: ``LocalProtocolError`` means the driver misused a machine (a bug in our code);
``RemoteProtocolError`` means the peer misbehaved. Machines convert remote errors into the
protocol's own reply inside ``handle()``; only local errors ever escape to the driver.
Never put credentials into an error message.
"""


class ProtocolError(Exception):
    """Base of every error a protocol machine raises."""


class LocalProtocolError(ProtocolError):
    """The driver fed an event the machine cannot take in its current state."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow here."""


class LineTooLongError(RemoteProtocolError):
    """A line (or a literal) exceeded its RFC-derived limit before it was complete."""
