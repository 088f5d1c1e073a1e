"""Which targets each workload runs against: the buffer and auth variants only where they matter."""

import pytest

from bench import runner, targets, workloads


def _by_kind() -> dict[str, list[runner.Workload]]:
    kinds: dict[str, list[runner.Workload]] = {}
    for workload in runner.workloads_for(workloads.FULL):
        kinds.setdefault(workload.kind, []).append(workload)
    return kinds


@pytest.mark.parametrize(
    ("kind", "with_auth_http", "with_large_buffers"),
    [
        ("saturated", True, False),
        ("paced", True, False),
        ("idle", True, True),
        ("fetch", False, True),
        ("fetch-small", False, True),
        ("smtp", False, False),
    ],
)
def test_variants_run_only_where_they_matter(
    kind: str, with_auth_http: bool, with_large_buffers: bool
) -> None:
    chosen = _by_kind()[kind]
    assert chosen
    for workload in chosen:
        assert runner.runs_against(workload, targets.MAILGRESS_AUTH_HTTP) is with_auth_http
        assert runner.runs_against(workload, "nginx-64k") is with_large_buffers
        assert all(runner.runs_against(workload, name) for name in ("direct", "mailgress", "nginx"))


def test_every_login_workload_of_both_protocols_has_the_like_for_like_row() -> None:
    login = [
        w.name for w in runner.workloads_for(workloads.FULL) if runner.runs_against(w, "mailgress-authhttp")
    ]
    assert login == ["imap-saturated", "imap-paced", "pop3-saturated", "pop3-paced", "idle-2000", "idle-5000"]


def test_the_target_names_list_the_auth_variant_after_mailgress() -> None:
    assert runner.target_names([], None)[:3] == ["direct", "mailgress", targets.MAILGRESS_AUTH_HTTP]
    assert runner.target_names([], ["nginx", targets.MAILGRESS_AUTH_HTTP]) == [
        targets.MAILGRESS_AUTH_HTTP,
        "nginx",
    ]
