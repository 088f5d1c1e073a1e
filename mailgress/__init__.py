"""The composition root: the ``mailgress`` console script and the standalone route source.

This package is the only place that imports both ``proxy`` and ``controller``: standalone mode
compiles MailRoute files with the controller's pure compiler and feeds the result to a proxy.
Neither ``proxy`` nor ``controller`` may import it.
"""
