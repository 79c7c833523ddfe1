"""The image, checked without a container engine: the Dockerfile as BuildKit's own parser reads it
(pinned official base, non-root user, no compilers in the final stage, the two commands, listening
on all interfaces), its install step against `make install`'s, and that install step run for
real on the files the build copies, into a fresh virtualenv whose Ferry then imports.

Not checked here (no engine on these machines): that the image builds, its size, that the base
tag still resolves, and that the processes start inside it."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VENV = "/opt/venv"
# Packages that would put a compiler or a build toolchain in an image.
BUILD_TOOLS = {"build-essential", "gcc", "g++", "cpp", "make", "clang", "cmake", "libc6-dev",
               "python3-dev", "pkg-config", "rustc", "cargo"}


def stages() -> list[list[dockerfile.Command]]:
    """The Dockerfile's instructions, one list per stage (each starts with its FROM)."""
    found: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            found.append([])
        assert found, f"{command.original!r} comes before any FROM"
        found[-1].append(command)
    return found


def stage_env(stage: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in stage:
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    return env


def shell_steps(stage: list[dockerfile.Command]) -> list[str]:
    """Each RUN's commands, split at ``&&``, whitespace normalized."""
    return [" ".join(step.split()) for command in stage if command.cmd == "RUN"
            for step in command.value[0].split("&&")]


def make_install_steps() -> list[str]:
    """The pip commands of `make install` (the Makefile's $(STAMP) recipe), as the image would run
    them: in its virtualenv, not editable, without the test extras."""
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    steps = [line.strip() for line in recipe.group(1).splitlines() if "pip install" in line]
    assert steps, "no pip install in the Makefile's install recipe"
    return [" ".join(step.replace("$(PY)", f"{VENV}/bin/python").replace(" -e ", " ")
                     .replace("'.[test]'", ".").split()) for step in steps]


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves ``relative`` (or a folder it is in) out of the context. Close
    to Docker's rules for the patterns used here (no ``!`` exceptions)."""
    assert not any(pattern.startswith("!") for pattern in patterns), "exceptions are not modelled here"
    parts = Path(relative).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, pattern.removeprefix("**/"))
               for pattern in patterns for prefix in prefixes)


def test_every_base_is_an_official_python_image_pinned_to_a_version() -> None:
    names: list[str] = []
    for stage in stages():
        image, *alias = stage[0].value
        if image in names:  # a stage built on an earlier one
            continue
        assert image.startswith(("python:", "docker.io/library/python:")), image
        tag = image.split(":", 1)[1].split("@")[0]
        assert re.fullmatch(r"3\.1[1-9]\.\d+-slim-[a-z]+", tag), f"{image}: not pinned to a slim Python release"
        names.extend(alias[1:] if alias else [])
    bases = {stage[0].value[0] for stage in stages()}
    assert len(bases) == 1, f"build and final stages on different bases: {bases}"
    assert len(stages()) >= 2


def test_final_stage_runs_as_a_non_root_user_without_build_tools() -> None:
    *builders, final = stages()
    users = [command.value[0] for command in final if command.cmd == "USER"]
    assert users, "the final stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so that Kubernetes' runAsNonRoot can check it.
    assert uid.isdigit() and int(uid) >= 1000 and (not gid or gid.isdigit()), users[-1]
    installs = " ".join(step for step in shell_steps(final) if re.search(r"\b(apt-get|apt|apk|pip)\b", step))
    assert not BUILD_TOOLS & set(re.findall(r"[\w.+-]+", installs)), installs
    # The final stage takes only the virtualenv from the build, not sources or build files.
    copies = [command for command in final if command.cmd in ("COPY", "ADD")]
    assert [(c.flags, c.value) for c in copies] == [(("--from=build",), (VENV, VENV))]


def test_default_command_is_the_api_and_the_worker_is_a_command_away() -> None:
    *_, final = stages()
    assert not [command for command in final if command.cmd == "ENTRYPOINT"], \
        "an ENTRYPOINT would prefix `python -m workers`"
    [cmd] = [command for command in final if command.cmd == "CMD"]
    # Exec form: python is PID 1 and gets SIGTERM itself (both processes stop gracefully on it).
    assert cmd.json and cmd.value == ("python", "-m", "api")
    assert stage_env(final)["PATH"].startswith(f"{VENV}/bin:")
    assert (ROOT / "workers" / "__main__.py").is_file() and (ROOT / "api" / "__main__.py").is_file()


def test_processes_listen_on_all_interfaces_and_keep_data_where_they_may_write() -> None:
    *_, final = stages()
    env = stage_env(final)
    assert env.get("FERRY_API_HOST") == "0.0.0.0" and env.get("FERRY_WORKER_WEB_HOST") == "0.0.0.0"
    # Every FERRY_ variable the image sets is a setting (a typo would be silently ignored).
    for name in (key for key in env if key.startswith("FERRY_")):
        assert name.removeprefix("FERRY_").lower() in Settings.model_fields, name
    [exposed] = [command.value for command in final if command.cmd == "EXPOSE"]
    defaults = Settings()
    assert set(exposed) == {str(defaults.api_port), str(defaults.worker_web_port)}
    data_dir = env["FERRY_WORKER_DATA_DIR"]
    [workdir] = [command.value[0] for command in final if command.cmd == "WORKDIR"]
    assert data_dir.startswith(workdir + "/")
    uid = [command.value[0] for command in final if command.cmd == "USER"][-1].split(":")[0]
    setup = " ".join(shell_steps(final))
    assert f"mkdir -p {data_dir}" in setup and f"chown -R {uid}:" in setup


def test_install_step_is_make_installs_without_the_test_extras() -> None:
    build, *_ = stages()
    pip_steps = [step for step in shell_steps(build) if "pip install" in step]
    assert pip_steps == make_install_steps()
    assert f"python -m venv {VENV}" in shell_steps(build)


def test_context_leaves_out_local_state_and_keeps_what_the_build_copies() -> None:
    patterns = dockerignore_patterns()
    for local in (".venv", ".local", ".git", "bench/results", "app/__pycache__", "tests"):
        assert ignored(local, patterns), local
    build, *_ = stages()
    for command in build:
        if command.cmd == "COPY":
            for source in command.value[:-1]:
                assert (ROOT / source).exists() and not ignored(source.rstrip("/"), patterns), source
    # Everything the project installs is copied (pyproject's packages, less the dev-only ones).
    copied = {source.rstrip("/") for command in build if command.cmd == "COPY" for source in command.value[:-1]}
    assert {"pyproject.toml", "README.md", "app", "api", "workers"} <= copied


def build_context(destination: Path) -> None:
    """The files the build stage copies into its WORKDIR, as Docker would (context less .dockerignore)."""
    patterns = dockerignore_patterns()
    build, *_ = stages()
    for command in build:
        if command.cmd != "COPY":
            continue
        *sources, target = command.value
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                shutil.copytree(origin, destination / target, dirs_exist_ok=True, ignore=lambda folder, names: [
                    name for name in names
                    if ignored(str((Path(folder) / name).relative_to(ROOT)), patterns)])
            else:
                copy = destination / target / origin.name if target.endswith("/") else destination / target
                shutil.copy2(origin, copy)


@pytest.mark.timeout(600)
def test_build_steps_install_a_ferry_that_imports(tmp_path: Path) -> None:
    """The build stage's RUN lines, run here on a copy of its COPYs with /opt/venv moved under
    tmp_path: the virtualenv gets Ferry and its dependencies, and nothing of the test extras."""
    context, venv = tmp_path / "src", tmp_path / "opt-venv"
    context.mkdir()
    build_context(context)
    build, *_ = stages()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "PYTHON"))}
    env |= stage_env(build)
    env.pop("PIP_NO_CACHE_DIR", None)  # the image keeps no cache; here the cache spares downloads
    env["PATH"] = f"{Path(sys.base_prefix) / 'bin'}:{env['PATH']}"  # `python`: this Python, outside .venv
    for command in build:
        if command.cmd == "RUN":
            subprocess.run(["bash", "-ec", command.value[0].replace(VENV, str(venv))], cwd=context, env=env,
                           check=True, timeout=540)

    python = str(venv / "bin" / "python")
    # From elsewhere, so that the installed packages are imported, not the sources.
    imported = subprocess.run([python, "-c", "import api.__main__, workers.__main__, app.topics, api, workers; "
                               "print(api.__file__)"], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert imported.stdout.strip().startswith(str(venv))
    subprocess.run([python, "-m", "pip", "check"], cwd=tmp_path, check=True, capture_output=True)
    missing = subprocess.run([python, "-c", "import pytest"], cwd=tmp_path, capture_output=True)
    assert missing.returncode != 0, "test extras were installed"
