# CPU image: the API, and CPU workers (ctransformers' bundled avx2/avx/basic builds).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends curl libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY api ./api
COPY worker ./worker
COPY queue_schema ./queue_schema
COPY inferq ./inferq
# The demo model is installed as package data (setup.cfg data_files).
COPY models/demo.gguf ./models/
RUN pip install --no-cache-dir .
# Nothing here needs root: a process that is broken into should not have it.
RUN useradd --system --no-create-home inferq
USER inferq
EXPOSE 8000
CMD ["gunicorn", "--config", "python:api.gunicorn_conf", "--workers", "2", "--bind", "0.0.0.0:8000", "api.wsgi:app"]
