"""Sans-IO mail protocol machines: bytes and events in, commands out.

Rules for every module in this package:
- no asyncio, socket, ssl, time or logging: the driver in ``proxy.server`` does all I/O and
  hands time in as ``TimedOut`` events;
- never put a credential into a reply, an error message or a ``repr``;
- before login, accept only the pre-auth subset in ../design.md; anything else gets the
  protocol's own error reply; after login the bytes are the driver's to relay, untouched.
"""
