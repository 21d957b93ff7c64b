"""The twistd entry point: options -> this process's service.

One process is a plain gateway (service.py), or with ``server.workers`` > 1
a supervisor, or one of its workers (workers.py). Both of those build on
service.py, which imports neither: each module depends one way.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from runner_gateway.service import GatewayService, StartupError, _LevelControl
from runner_gateway.settings import Settings, SettingsError, load_settings

__all__ = ["Options", "make_service"]


class Options(usage.Options):
    synopsis = "[--env NAME] [--settings DIR] [--logging-level LEVEL]"
    longdesc = (
        "Serve the runner gateway. Settings come from DIR/settings.yaml overlaid by "
        "DIR/NAME.yaml (NAME from --env, else $RUNNER_GATEWAY_ENV, else $GO_ENV), then "
        "LOGGING_LEVEL, PASETO_SECRET_KEY, SERVER_ADDRESS, SERVER_CERTIFICATE_PATH and "
        "SERVER_KEY_PATH from the environment."
    )
    optParameters = [
        ["env", "e", None, "settings overlay name (settings/NAME.yaml)"],
        ["settings", "s", "settings", "settings directory"],
        ["logging-level", None, None, "override logging.level (trace, debug, info, warn, error)"],
        # Internal (workers.py): set by the supervisor on the worker processes it starts.
        ["worker-fd", None, None, "internal: serve on this inherited listening socket"],
        ["worker-index", None, None, "internal: this worker's number"],
        ["supervisor-pid", None, None, "internal: the supervisor a worker stops without"],
    ]


def make_service(options: Options | dict[str, Any], reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor

    def load() -> Settings:
        return load_settings(
            options["settings"], env=options["env"], logging_level=options["logging-level"]
        )

    try:
        settings = load()
    except SettingsError as exc:
        raise StartupError(str(exc)) from None
    control = _LevelControl(settings.logging.level, settings.logging.format)
    from zope.interface import directlyProvides

    directlyProvides(control, ILogObserver)
    try:
        # server.workers > 1: this process supervises workers (workers.py).
        if options.get("worker-fd") is not None:
            from runner_gateway.workers import make_worker

            return make_worker(options, load, reactor, control)
        if settings.server.workers > 1:
            from runner_gateway.workers import Supervisor

            return Supervisor(options, settings, reactor, observer=control)  # type: ignore[arg-type]
        return GatewayService(load, reactor, observer=control)  # type: ignore[arg-type]
    except (SettingsError, ValueError) as exc:  # ValueError: TLSConfigError, key errors
        raise StartupError(str(exc)) from None
