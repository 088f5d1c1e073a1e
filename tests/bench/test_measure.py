"""The CPU of a run measured in stretches adds up per party."""

from bench import measure


def test_cpu_of_two_stretches_adds_up_per_party() -> None:
    first = measure.CpuUse(proxy=1.0, proxy_user=0.5, auth=0.25, backends=2.0, bench=0.125, other=0.0)
    second = measure.CpuUse(proxy=0.5, proxy_user=0.25, auth=0.5, backends=1.0, bench=0.25, other=3.0)
    assert measure.CpuUse.sum([first, second]) == measure.CpuUse(
        proxy=1.5, proxy_user=0.75, auth=0.75, backends=3.0, bench=0.375, other=3.0
    )
