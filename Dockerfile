# Two images from one file: `--target api` (the HTTP app, no torch) and `--target worker`
# (torch + the training stack; runs training and light workers). docker-compose.yml builds both.
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DATA_DIR=/data
WORKDIR /app
RUN useradd --create-home app && mkdir -p /data && chown app /data

FROM base AS api
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY service ./service
COPY cli ./cli
COPY migrations ./migrations
# The migrations ship inside the package (`finetune migrate` needs no source tree). No torch.
RUN pip install . && rm -rf core service cli migrations
USER app
EXPOSE 8000
CMD ["finetune", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]

FROM base AS worker
# torch first, in its own layer: gigabytes that a code change must not download again.
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
RUN pip install $TORCH_SPEC
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY service ./service
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install '.[worker]' && rm -rf core service worker cli migrations
USER app
# Both queues by default; docker-compose.yml gives each queue its own workers.
CMD ["finetune", "worker"]
