FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY ragstream ragstream
COPY consumers consumers
COPY producers producers
COPY schemas schemas
COPY config config
RUN pip install --no-cache-dir '.[s3]' && useradd --system ragstream && mkdir -p /var/lib/ragstream/blobs \
    && chown ragstream /var/lib/ragstream/blobs
USER ragstream
EXPOSE 9464
CMD ["ragstream", "--help"]
