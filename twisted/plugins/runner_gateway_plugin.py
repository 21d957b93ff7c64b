"""twistd plugin: ``twistd -n runner-gateway --env NAME``."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _RunnerGatewayMaker:
    tapname = "runner-gateway"
    description = "TLS and PASETO bearer-token gateway for Ollama and OpenAI-compatible runners"

    @property
    def options(self) -> Any:
        # Imported late: twistd imports every plugin module to list them.
        from runner_gateway.entry import Options

        return Options

    def makeService(self, options: Any) -> Any:
        from runner_gateway.entry import make_service

        return make_service(options)


serviceMaker = _RunnerGatewayMaker()
