"""A real client: Debian's kubectl 1.20 applies the CRD and a MailRoute to the emulator, and
``kubectl get -o jsonpath`` shows the Programmed condition the controller wrote.

kubectl comes from Debian's ``kubernetes-client`` package, extracted (``apt-get download`` and
``dpkg-deb -x``) into a cache folder once per machine: installing it is refused on this image,
whose own kubectl package owns the same path, and that kubectl is left alone. kubectl 1.20 needs
``--validate=false`` (the emulator serves no OpenAPI document).
"""

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.kube.conftest import (
    CRD_FILE,
    TEST_TOKEN,
    Api,
    ControllerRunner,
    FakeProxy,
    imap_route,
    kubeconfig_text,
)
from tests.kube.emulator import Emulator
from tests.kube.test_operator import PROXIES, create_proxy_pods

PACKAGE = "kubernetes-client"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mailgress" / PACKAGE
KUBECTL = CACHE / "usr" / "bin" / "kubectl"
# apt needs a while on a cold cache; kubectl itself answers in well under a second.
APT_TIMEOUT_SECONDS = 300
KUBECTL_TIMEOUT_SECONDS = 60
# Until the proxies acked and the status was written: bounded, each poll is one kubectl run.
MAX_POLLS = 150
POLL_SECONDS = 0.1


def _apt(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=APT_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.fixture(scope="session")
def kubectl() -> Path:
    """Debian's kubectl, extracted from its package into the cache on first use."""
    if KUBECTL.exists():
        return KUBECTL
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.fail(f"apt-get and dpkg-deb are needed to extract {PACKAGE}", pytrace=False)
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(scratch)
        fetched = _apt("download", PACKAGE, cwd=where)
        if fetched.returncode != 0:  # no package lists yet on a fresh machine
            _apt("update", cwd=where)
            fetched = _apt("download", PACKAGE, cwd=where)
        packages = sorted(where.glob(f"{PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not packages:
            pytest.fail(f"apt-get download {PACKAGE} failed: {fetched.stderr.strip()}", pytrace=False)
        staging = CACHE.with_name(CACHE.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["dpkg-deb", "-x", str(packages[0]), str(staging)], check=True, timeout=APT_TIMEOUT_SECONDS
        )
        shutil.rmtree(CACHE, ignore_errors=True)
        staging.rename(CACHE)  # whole or not at all: a half-extracted folder is never used
    return KUBECTL


async def run_kubectl(kubectl: Path, kubeconfig: Path, *arguments: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(kubectl),
        f"--kubeconfig={kubeconfig}",
        f"--cache-dir={kubeconfig.parent / 'kubectl-cache'}",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(KUBECTL_TIMEOUT_SECONDS):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, f"kubectl {' '.join(arguments)} failed: {err.decode()}"
    return out.decode()


async def test_kubectl_applies_and_reads_the_programmed_condition(
    emulator: Emulator, api: Api, controller_runner: ControllerRunner, kubectl: Path, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubectl-config"
    kubeconfig.write_text(kubeconfig_text(str(emulator.url), TEST_TOKEN))
    created = await run_kubectl(kubectl, kubeconfig, "apply", "--validate=false", "-f", str(CRD_FILE))
    assert "customresourcedefinition.apiextensions.k8s.io/mailroutes.mailgress.io created" in created
    await create_proxy_pods(api)
    controller = await controller_runner.start()
    manifest = tmp_path / "mailroute.yaml"
    manifest.write_text(yaml.safe_dump(imap_route("example", "example.com")))
    programmed = '{.status.conditions[?(@.type=="Programmed")]}'
    jsonpath = f"jsonpath={programmed[:-1]}.status}} {programmed[:-1]}.message}}"
    async with FakeProxy(PROXIES[0], controller.port), FakeProxy(PROXIES[1], controller.port):
        applied = await run_kubectl(kubectl, kubeconfig, "apply", "--validate=false", "-f", str(manifest))
        assert "mailroute.mailgress.io/example created" in applied
        shown = ""
        for _ in range(MAX_POLLS):
            shown = await run_kubectl(
                kubectl, kubeconfig, "get", "mailroute", "example", "-n", "mail", "-o", jsonpath
            )
            if shown == "True 2 of 2 proxies":
                break
            await asyncio.sleep(POLL_SECONDS)
        assert shown == "True 2 of 2 proxies"
        # The short name comes from the CRD, through the emulator's discovery. (Not the category:
        # kmock's discovery gives mailroutes/status the category too, and kubectl then asks for it.)
        assert "example" in await run_kubectl(kubectl, kubeconfig, "get", "mr", "-n", "mail")
