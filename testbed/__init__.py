"""The testbed: real Dovecot and Postfix on loopback, shared by the tests, the demo and the benchmarks.

Package map:
- ``mailservers``    one Dovecot or Postfix instance under a directory: start, stop, users, maildirs.
- ``backends``       the standard set (Dovecot for alpha.example, Dovecot for beta.example, Postfix
                     for both, an auth-only Dovecot for Postfix's SASL) with its users and passwords.
- ``proxysettings``  the standalone proxy settings file and MailRoute manifests in front of a testbed.
- ``proxyprocess``   ``mailgress proxy`` as a child process: start, wait for /readyz, stop, its log.
- ``proxyfleet``     proxies in controller mode, as the pods of one Deployment (token, snapshot,
                     the controller's port), and a stand-in controller.
- ``clients``        ``curl`` and ``swaks`` runs that keep passwords off command lines and out of output,
                     the logins imaplib/poplib lack, and a raw line client.
- ``messages``       test messages: small ones with unique Message-IDs, large ones of an exact size.
- ``nginx``          a private nginx with its mail module: the reference the proxy is compared with.
- ``authservice``    an nginx-style auth_http service, scriptable per test, recording every request.
- ``tlscerts``       throw-away CA and certificates made with openssl.
- ``demo``           ``python -m testbed.demo`` (``make demo``).
Never imported by ``proxy``, ``controller`` or ``mailgress``; never touches the system's own mail
services or /etc; binds only 127.0.0.1. ``install-system-packages.sh`` installs what it needs.
"""
