"""docker-compose.yml: it parses, every command is a real entry point of the project, and
every variable it reads is documented (no Docker engine runs here)."""

from __future__ import annotations

import re
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
APP_SERVICES = ("migrate", "web", "worker-fulfillment", "worker-execution")


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else command.split()


def test_services_present_with_healthchecks() -> None:
    services = COMPOSE["services"]
    for name in ("postgres", "redis", "web", "worker-fulfillment", "worker-execution",
                 "anvil-source", "anvil-destination", "jaeger"):  # fmt: skip
        assert name in services
    for name in ("postgres", "redis", "web", "worker-fulfillment"):
        assert "healthcheck" in services[name], name
    assert "--requirepass" in services["redis"]["command"]
    assert "noeviction" in services["redis"]["command"]
    assert "--hash-max-listpack-value 256" in services["redis"]["command"]


def test_app_commands_point_at_real_entry_points() -> None:
    commands = get_commands()
    for name in APP_SERVICES:
        argv = _command(COMPOSE["services"][name])
        if argv[:2] == ["python", "manage.py"]:
            assert argv[2] in commands, f"{name}: no management command {argv[2]!r}"
        else:
            assert argv[0] == "gunicorn"
            module, _, attribute = argv[1].partition(":")
            assert hasattr(import_module(module), attribute), argv[1]
    for check in ("worker-fulfillment",):
        test = COMPOSE["services"][check]["healthcheck"]["test"]
        assert test[1:4] == ["python", "manage.py", "queue_health"]
        assert "queue_health" in commands
    queues = {
        _command(COMPOSE["services"][n])[-1] for n in ("worker-fulfillment", "worker-execution")
    }
    assert queues == {"intent-fulfillment", "blockchain-execution"}


def test_every_variable_is_documented() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    assert used <= documented, used - documented
    readme = (ROOT / "README.md").read_text()
    missing = [v for v in used if f"`{v}`" not in readme]
    assert not missing, f"not in the README's configuration reference: {missing}"


def test_dockerfile_copies_what_exists() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source
