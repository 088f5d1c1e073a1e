"""The proxy's drivers: every socket, TLS context, clock and task lives here and nowhere else.

``listeners`` accepts, ``session`` drives one client through a protocol front-end, ``backends``
picks endpoints and runs the backend login, ``relay`` copies bytes once logged in, ``routes``
keeps the current routing table, ``admin`` serves /metrics, /healthz and /readyz.
"""
