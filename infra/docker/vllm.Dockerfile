# vLLM for the `gpu` profile of docker-compose.yml: the upstream image, pinned, run as a non-root
# user whose home and /models (weights and caches; a fresh named volume takes this ownership) are
# writable. Nothing else changes: flags come from docker-compose.yml.
#
#   docker build -f infra/docker/vllm.Dockerfile -t qwen-stack/vllm:v0.18.0 infra/docker
#
# v0.18.0 or newer: --shutdown-timeout (drain running requests on SIGTERM) first shipped there.
# Pin by digest too once you build where the registry is reachable.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.18.0
FROM ${VLLM_IMAGE}
RUN groupadd --system --gid 10002 vllm \
 && useradd --system --uid 10002 --gid vllm --home-dir /home/vllm --create-home \
        --shell /usr/sbin/nologin vllm \
 && mkdir -p /models \
 && chown vllm:vllm /models
ENV HOME=/home/vllm \
    HF_HOME=/models/hf \
    VLLM_CACHE_ROOT=/models/vllm-cache \
    XDG_CACHE_HOME=/models/cache
USER 10002:10002
ENTRYPOINT ["vllm", "serve"]
