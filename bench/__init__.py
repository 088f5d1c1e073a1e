"""The benchmark: mailgress side by side with nginx's mail module and a direct connection.

Not tests: ``python -m bench`` (``make bench``) runs it and writes docs/benchmarks.md. Map:
- ``__main__``     the command line; ``runner`` the rounds and the profiling pass.
- ``targets``      the mail servers of a round (``Bed``) and what is measured: direct, mailgress,
                   nginx (with ``authserver``, its auth_http service, as a process of its own).
- ``workloads``    one measured run: warm-up, counters before and after, the clients' work.
- ``clients``      lean IMAP, POP3 and SMTP dialogues that time their logins.
- ``measure``      /proc readings (CPU, resident memory, the machine's busy time) and statistics.
- ``profiling``    py-spy attached to mailgress, and what its samples say.
- ``environment``  versions and machine; ``report`` the Markdown.
- ``relay_throughput``  the relay's own micro-benchmark (run by hand; see its docstring).
- ``micro``        a small relayed exchange by splice or by copy, and a minimal session as
                   callbacks or as a coroutine (``python -m bench.micro``; run by hand).
- ``convergence``  route convergence and compile cost (``python -m bench.convergence``; its own
                   command and its own report, docs/convergence.md).
Never imported by ``proxy``, ``controller`` or ``mailgress``; binds and connects to 127.0.0.1 only.
"""
