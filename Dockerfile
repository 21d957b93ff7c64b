# runner-gateway container: `make docker` (docker build -t runner-gateway .), then e.g.
#   docker run -d -p 8443:8443 --add-host=host.docker.internal:host-gateway \
#     --restart unless-stopped --stop-timeout 40 --name runner-gateway -e GO_ENV=my-domain \
#     -v ./settings:/opt/gateway/settings -v ${HOME}/.acme.sh:/opt/gateway/.acme.sh runner-gateway
# docs/deploy.md explains the volumes, the user id and certificate renewal.

# ---- builder: the locked dependencies, then the wheel, into a venv
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The dependencies come from the lock (exact versions, hashes checked), in a
# layer of their own that is rebuilt only when the lock changes (make lock).
COPY requirements/runtime.txt requirements/
RUN python -m venv /opt/gateway/.venv \
 && /opt/gateway/.venv/bin/pip install --require-hashes -r requirements/runtime.txt
COPY pyproject.toml setup.cfg setup.py README* ./
COPY runner_gateway/ runner_gateway/
COPY twisted/plugins/runner_gateway_plugin.py twisted/plugins/
# --no-deps: the lock above is the whole dependency set. The last step builds
# twistd's plugin cache now: it lives beside the plugins, where the runtime
# user cannot write (otherwise a warning at every start).
RUN /opt/gateway/.venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/gateway/.venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/gateway/.venv/bin/pip check \
 && /opt/gateway/.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# ---- runtime: the venv, the settings and nothing else
FROM python:3.11-slim AS runtime
# The id defaults to 1000, the usual id of the first user on a host, so that
# keys acme.sh wrote with mode 600 in that user's ~/.acme.sh are readable
# through the volume. Build with --build-arg GATEWAY_UID=$(id -u) otherwise.
ARG GATEWAY_UID=1000
ARG GATEWAY_GID=1000
RUN groupadd --system --gid "${GATEWAY_GID}" gateway \
 && useradd --system --uid "${GATEWAY_UID}" --gid gateway --no-create-home \
        --home-dir /opt/gateway --shell /usr/sbin/nologin gateway
ENV PATH=/opt/gateway/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/gateway
COPY --from=builder /opt/gateway/.venv /opt/gateway/.venv
# Build-time settings; a volume on /opt/gateway/settings replaces them.
# Owned by root: the gateway only reads them (.dockerignore keeps private keys out).
COPY settings/ /opt/gateway/settings/
USER gateway
EXPOSE 8443
# /healthz over https, else plain http (a gateway without certificates). The
# certificate is for the public name, not 127.0.0.1: this probe skips
# verification on purpose. SERVER_ADDRESS, when set, gives the port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, ssl, sys, urllib.request\nport = os.environ.get('SERVER_ADDRESS', ':8443').rpartition(':')[2] or '8443'\ndef ok(scheme):\n    try:\n        with urllib.request.urlopen(f'{scheme}://127.0.0.1:{port}/healthz', timeout=4, context=ssl._create_unverified_context()) as r:\n            return r.status == 200\n    except Exception:\n        return False\nsys.exit(0 if ok('https') or ok('http') else 1)\n"]
ENTRYPOINT ["twistd", "-n", "--pidfile=", "runner-gateway"]
