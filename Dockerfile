# The GPU worker image: thinkbatch with vLLM's GPU build, the checkout at THINKBATCH_HOME.
#   docker build -t ghcr.io/your-org/thinkbatch:0.1.0-vllm0.32.0 .
# Prefect's Kubernetes and Docker workers run `prefect flow-run execute` in it
# (deployments/work-pools/); `docker run --gpus all ... thinkbatch run job.yaml` runs a
# job on one node without Prefect's server.
#
# Base: vLLM's own release image, not a CUDA image plus `pip install vllm`: it is the build
# vLLM tests and ships, with torch, the CUDA runtime and the attention and MoE kernels
# (FlashInfer, DeepGEMM) built in ahead of time, where a pip install fetches or compiles
# kernels on first use, which a GPU node without internet cannot do.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

# tini: PID 1 (reaps orphans, passes signals on); procps: pkill for the entrypoint.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini procps \
    && rm -rf /var/lib/apt/lists/*

ENV THINKBATCH_HOME=/opt/thinkbatch
WORKDIR ${THINKBATCH_HOME}
COPY . .

# thinkbatch with the `gpu` extra, editable: the code that runs is the checkout above (the
# deployments' entrypoints are its files), in the Python that has vLLM (`python3`: a venv
# or the system's, ours to install into; pip is bootstrapped where the base has uv only).
# The base's GPU stack is held where it is (constraints): vllm==0.32.0 must be the base's
# vLLM, or the build fails here.
RUN export PIP_BREAK_SYSTEM_PACKAGES=1 \
    && (python3 -m pip --version >/dev/null 2>&1 || python3 -m ensurepip) \
    && python3 -m pip list --format=freeze \
      | grep -iE '^(vllm|torch|triton|xformers|flashinfer[-_a-z]*|deep[-_]gemm|nvidia-[-_a-z0-9]+)==' \
      > /tmp/gpu-stack.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/gpu-stack.txt -e ".[gpu]" \
    && python3 -c "import vllm, prefect, thinkbatch.flows.cli" \
    && rm /tmp/gpu-stack.txt

# A worker never downloads a model: the weights come from a read-only volume
# (engine.model is a path in it). vLLM's torch.compile and Triton caches go to /cache, a
# volume that outlives the container, so the next engine on the node starts warm.
ENV HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/cache/vllm \
    TRITON_CACHE_DIR=/cache/triton

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/thinkbatch/scripts/entrypoint.sh"]
CMD ["prefect", "flow-run", "execute"]
