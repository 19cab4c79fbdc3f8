# One image for the API and the workers; the command picks the role.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
RUN pip install $TORCH_SPEC && pip install .
RUN useradd --create-home app && mkdir -p /data && chown app /data
USER app
ENV DATA_DIR=/data
EXPOSE 8000
CMD ["finetune", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
