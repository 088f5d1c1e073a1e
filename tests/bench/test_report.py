"""The report's "Where we stand" lines: login compared like with like, idle memory per connection.

Rendered from small hand-made results documents (no benchmark run): the figures in them are
chosen so that each ratio and verdict has one right answer.
"""

from typing import Any

from bench import report, targets

PACED = {"name": "imap-paced", "title": "IMAP, paced", "kind": "paced"}
IDLE = {"name": "idle-2000", "title": "2,000 idle", "kind": "idle"}


def _row(workload: str, target: str, *, proxy: float, auth: float = 0.0, rss: float | None = None) -> Any:
    cpu = {"proxy": proxy, "proxy_user": proxy / 2, "auth": auth, "backends": 0.0, "bench": 0.0, "other": 0.0}
    return {
        "workload": workload,
        "target": target,
        "round": 0,
        "operations": 1000,
        "failures": 0,
        "first_failure": "",
        "seconds": 10.0,
        "cpu": cpu,
        "latencies": [0.001],
        "relayed_bytes": 0,
        "rss_per_connection": rss,
        "intact": None,
    }


def _document(rows: list[Any], workloads: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "mode": "quick",
        "command": "python -m bench",
        "started": "2026-11-27T00:00:00+00:00",
        "minutes": 1.0,
        "environment": {},
        "scale": {"rounds": 1},
        "workloads": workloads,
        "targets": ["mailgress", targets.MAILGRESS_AUTH_HTTP, "nginx"],
        "measurements": rows,
        "profiles": {},
    }


def _line(text: str, start: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


def test_the_login_line_gives_both_ratios_against_nginx() -> None:
    rows = [
        _row("imap-paced", "mailgress", proxy=1.0),
        _row("imap-paced", targets.MAILGRESS_AUTH_HTTP, proxy=1.5, auth=0.4),
        _row("imap-paced", "nginx", proxy=0.5, auth=0.4),
    ]
    line = _line(report.render(_document(rows, [PACED])), "- Login (imap-paced)")
    assert "nginx 0.500 CPU s per 1,000 sessions" in line
    assert (
        "plus 0.400 in the auth_http service); mailgress (as deployed: `auth: backend`) 1.00, 2.00x" in line
    )
    assert f"{targets.MAILGRESS_AUTH_HTTP} (like for like: asks nginx's auth_http service) 1.50 " in line
    assert "1.50 (plus 0.400 in the auth_http service), 3.00x nginx's: **not met**." in line


def test_a_login_line_without_the_like_for_like_row_says_it_was_not_measured() -> None:
    rows = [_row("imap-paced", "mailgress", proxy=0.4), _row("imap-paced", "nginx", proxy=0.5, auth=0.4)]
    line = _line(report.render(_document(rows, [PACED])), "- Login (imap-paced)")
    assert "(as deployed: `auth: backend`) 0.400, 0.80x nginx's: **met**" in line
    assert (
        f"{targets.MAILGRESS_AUTH_HTTP} (like for like: asks nginx's auth_http service) -, - nginx's: "
        in line
    )
    assert line.endswith("**not measured**.")


def test_the_idle_line_gives_both_mailgress_rows() -> None:
    rows = [
        _row("idle-2000", "mailgress", proxy=0.2, rss=7 * 1024),
        _row("idle-2000", targets.MAILGRESS_AUTH_HTTP, proxy=0.3, auth=0.1, rss=7.5 * 1024),
        _row("idle-2000", "nginx", proxy=0.1, auth=0.1, rss=10 * 1024),
    ]
    line = _line(report.render(_document(rows, [IDLE])), "- Idle (idle-2000)")
    assert "**met**. mailgress 7.00 KiB (asking auth_http 7.50 KiB), nginx 10.0 KiB" in line


def test_the_header_says_what_the_auth_service_column_holds() -> None:
    rows = [_row("imap-paced", "nginx", proxy=0.5, auth=0.4)]
    text = report.render(_document(rows, [PACED]))
    assert f"The auth_http service that nginx and {targets.MAILGRESS_AUTH_HTTP} ask at every login" in text
    assert "the proxy's own side of that HTTP exchange is in the proxy's figure" in text


SMALL = {"name": "imap-fetch-small", "title": "FETCH of small messages", "kind": "fetch-small"}
TWENTY = {"name": "imap-fetch-20mb", "title": "FETCH of 20 MB", "kind": "fetch"}


def _relayed(workload: str, target: str, *, proxy: float, gigabytes: float) -> Any:
    return {**_row(workload, target, proxy=proxy), "relayed_bytes": int(gigabytes * report.GB)}


def test_the_small_message_fetch_is_reported_for_reference_not_as_the_relay_target() -> None:
    rows = [
        _relayed("imap-fetch-small", "mailgress", proxy=0.6, gigabytes=0.2),
        _relayed("imap-fetch-small", "nginx", proxy=0.4, gigabytes=0.2),
        _relayed("imap-fetch-small", "nginx-64k", proxy=0.3, gigabytes=0.2),
    ]
    text = report.render(_document(rows, [SMALL]))
    assert "| mailgress | 20.0 | 3.00 | 50 | 1.50x | 0 of 1000 | 0 |" in text
    line = _line(text, "- Relay, many small messages (imap-fetch-small)")
    assert "not a target (the issue states the relay target on the 20 MB FETCH); for reference." in line
    assert "mailgress 3.00 CPU s/GB, 1.50x nginx's 2.00; 20.0 MB/s against nginx's 20.0." in line
    assert line.endswith("With proxy_buffer 64k nginx uses 1.50 CPU s/GB at 20.0 MB/s.")
    assert "**met**" not in line and "**not met**" not in line
    assert not [line for line in text.splitlines() if line.startswith("- Relay (imap-fetch-small)")]


def test_the_relay_target_stays_on_the_20_mb_fetch_beside_the_small_one() -> None:
    rows = [
        _relayed("imap-fetch-20mb", "mailgress", proxy=0.2, gigabytes=1.0),
        _relayed("imap-fetch-20mb", "nginx", proxy=0.5, gigabytes=1.0),
        _relayed("imap-fetch-small", "mailgress", proxy=0.6, gigabytes=0.2),
        _relayed("imap-fetch-small", "nginx", proxy=0.4, gigabytes=0.2),
    ]
    text = report.render(_document(rows, [TWENTY, SMALL]))
    assert "**met**. mailgress 0.200 CPU s/GB against a limit of 0.250" in _line(
        text, "- Relay (imap-fetch-20mb)"
    )
    assert _line(text, "- Relay, many small messages (imap-fetch-small)")
