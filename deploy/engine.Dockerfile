# vLLM with the kvtier connector (the engine image of deploy/kubernetes/examples/vllm.yaml).
#   docker build -f deploy/engine.Dockerfile -t ghcr.io/kvtier/vllm-kvtier:0.1.0 .
# The connector is pure Python (no build step); tested with vLLM 0.32.
FROM vllm/vllm-openai:v0.32.0
COPY client/python /opt/kvtier-python
RUN pip install --no-cache-dir /opt/kvtier-python
