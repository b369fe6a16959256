# The CDS service in a container: gunicorn on 0.0.0.0:8080, configuration from CDS_* variables.
#   docker build -t crc-cds-service .
#   docker run -d --restart unless-stopped -p 8080:8080 -v cds-data:/data \
#              -e CDS_AUDIT_KEY=$(openssl rand -hex 32) -e CDS_PUBLIC_BASE_URL=https://cds.example.org \
#              -e CDS_TRUSTED_ISSUERS='{"https://ehr.example":"https://ehr.example/jwks.json"}' crc-cds-service
# gunicorn's master is the container's main process: if it dies, the container stops with every
# worker in it, and the restart policy (--restart unless-stopped; restart: unless-stopped in Compose;
# a Deployment in Kubernetes) starts a fresh one. Without a restart policy nothing restarts it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# constraints.txt: the dependency versions the test suite ran with, so the image runs what was tested.
COPY pyproject.toml README.md constraints.txt ./
COPY cds_service ./cds_service
COPY mappings ./mappings
COPY cards ./cards
COPY fixtures ./fixtures
# A regular (not editable) install: the data folders go inside the package (see pyproject.toml).
RUN pip install -c constraints.txt . && rm -rf /app/*

# Never run as root; the SQLite store lives on a volume (use CDS_DATABASE_URL=postgresql://… for several
# containers). PROMETHEUS_MULTIPROC_DIR: gunicorn workers share metrics through files there.
RUN useradd --system --uid 10001 --home-dir /data cds && mkdir -p /data /tmp/cds-metrics \
    && chown cds /data /tmp/cds-metrics
USER cds
WORKDIR /data
VOLUME ["/data"]
ENV CDS_DATABASE_URL=sqlite:////data/cds-service.db \
    PROMETHEUS_MULTIPROC_DIR=/tmp/cds-metrics \
    CDS_WORKERS=2 \
    CDS_THREADS=8

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"
CMD ["cds-service", "serve", "--host", "0.0.0.0", "--port", "8080"]
