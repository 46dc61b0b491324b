# The image the k8s/ manifests run: `beeline gateway` or `beeline router`.
FROM python:3.11-slim
RUN useradd --uid 10001 --create-home beeline
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY gateway ./gateway
COPY router ./router
COPY beeline ./beeline
RUN pip install --no-cache-dir .
USER 10001
EXPOSE 8080 8090
CMD ["beeline", "gateway"]
