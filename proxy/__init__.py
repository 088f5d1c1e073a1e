"""mailgress proxy: the data plane.

Package map (who calls whom):
- ``table``      the routing-table contract shared with the controller (pure).
- ``balancing``  endpoint order for a login: user-hash and round-robin (pure).
- ``protocols``  sans-IO IMAP, POP3 and SMTP machines: bytes and events in, commands out (pure).
- ``server``     every socket, TLS context, clock and task: listeners, sessions, backends, relay, admin.
- ``settings``   the settings file (standalone and in-cluster alike).
- ``cli``        the ``mailgress`` console script.
Pure modules never import ``server``; import-linter contracts in pyproject.toml enforce it.
"""
