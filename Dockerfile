# One image for the scheduler, the workers and the dashboard (docker-compose.yml).
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TCP_NODELAY=1
RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*
WORKDIR /dicomflow
COPY pyproject.toml README.md ./
COPY dicomflow ./dicomflow
COPY scheduler ./scheduler
COPY worker ./worker
RUN pip install --no-cache-dir .
COPY services ./services
RUN for r in services/modules/*/requirements.txt; do [ -f "$r" ] && pip install --no-cache-dir -r "$r" || true; done
COPY orthanc ./orthanc
COPY service.sh ./
RUN useradd --system --uid 1000 dicomflow && mkdir -p /state && chown dicomflow /state
USER dicomflow
ENV DICOMFLOW_SERVICES_DIR=/dicomflow/services DICOMFLOW_HOME=/state
