FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libjpeg-turbo-progs fonts-dejavu-core && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY mapping ./mapping
COPY store ./store
RUN pip install --no-cache-dir .
RUN useradd --system --home /data clinphoto && mkdir -p /data && chown clinphoto /data
USER clinphoto
ENV CLINPHOTO_DATA_DIR=/data CLINPHOTO_HTTP_HOST=0.0.0.0
EXPOSE 8080 2575 11112
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz').status != 200)"
CMD ["clinphoto", "serve"]
