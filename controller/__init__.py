"""mailgress controller: MailRoutes (and backend endpoints) in, a routing table out.

Package map:
- ``mailroute``  typed view of a MailRoute; ``parse(body)`` -> MailRoute or SpecError (pure).
- ``compiler``   routes + endpoints -> routing table + conditions per object (pure, sorted, hashed).
It imports ``proxy.table`` (the contract) and nothing else from the proxy.
"""
