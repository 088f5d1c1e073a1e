"""The image's Dockerfile (deploy/images/Dockerfile) keeps the promises the chart relies on.

No Docker engine here, so the file is read, not built: a pinned base, a final stage that installs
nothing and runs as the user the chart's securityContext names, the console script the chart's
arguments are for, and every file the code reads at run time (the CRD schema) copied in.
"""

import re
import tomllib
from pathlib import Path

from controller import mailroute
from deploy import render
from tests.charts.conftest import SCENARIOS, one

DOCKERFILE = render.DEPLOY / "images" / "Dockerfile"
PINNED = re.compile(r"python:(\d+)\.(\d+)\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def test_base_image_is_pinned_and_runs_the_projects_python() -> None:
    [base] = [rest for keyword, rest in instructions() if keyword == "ARG" and rest.startswith("BASE=")]
    pinned = PINNED.fullmatch(base.removeprefix("BASE="))
    assert pinned, f"{base}: pin the exact Python release (and a digest for production builds)"
    project = tomllib.loads((render.ROOT / "pyproject.toml").read_text())["project"]
    floor = re.fullmatch(r">=(\d+)\.(\d+)", project["requires-python"])
    assert floor is not None
    assert (int(pinned.group(1)), int(pinned.group(2))) >= (int(floor.group(1)), int(floor.group(2)))
    assert all(rest.split()[0] == "${BASE}" for keyword, rest in instructions() if keyword == "FROM")


def test_multi_stage_final_stage_installs_nothing_and_runs_unprivileged() -> None:
    build, final = stages()
    assert "AS build" in build[0][1]
    commands = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "pip install" not in commands and "apt-get" not in commands
    assert "pip uninstall --yes pip" in commands
    assert [rest for keyword, rest in final if keyword == "COPY"] == [
        "--from=build /opt/mailgress /opt/mailgress",
        "--from=build /app /app",
    ]
    [user] = [rest for keyword, rest in final if keyword == "USER"]
    uid, gid = (int(part) for part in user.split(":"))
    for scenario in SCENARIOS:
        for component in ("proxy", "controller"):
            context = one(scenario, "Deployment", component)["spec"]["template"]["spec"]["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"]) == (uid, gid) != (0, 0)


def test_entrypoint_is_the_console_script_the_chart_calls() -> None:
    _, final = stages()
    [entrypoint] = [rest for keyword, rest in final if keyword == "ENTRYPOINT"]
    scripts = tomllib.loads((render.ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == '["mailgress"]'
    assert scripts["mailgress"] == "mailgress.cli:main"


def test_the_build_copies_every_package_and_the_crd_schema() -> None:
    build, _ = stages()
    copied = [rest.split()[0] for keyword, rest in build if keyword == "COPY"]
    for package in ("proxy", "controller", "mailgress"):
        assert package in copied
    # controller/mailroute.py reads the MailRoute schema next to the packages at import.
    crd = Path(mailroute.CRD_PATH).relative_to(render.ROOT)
    assert any(crd.is_relative_to(source) for source in copied), f"{crd} is not in the image"
