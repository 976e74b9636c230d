FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ragstream ragstream
COPY consumers consumers
COPY producers producers
COPY schemas schemas
COPY config config
# A fixed uid and gid, so a Kubernetes pod can name them (deploy/k8s: runAsUser, fsGroup).
RUN pip install --no-cache-dir '.[s3]' && groupadd --gid 10001 ragstream \
    && useradd --no-create-home --uid 10001 --gid ragstream ragstream && mkdir -p /var/lib/ragstream/blobs \
    && chown ragstream /var/lib/ragstream/blobs
USER ragstream
EXPOSE 9464
CMD ["ragstream", "--help"]
