# The image the k8s/ manifests run: `beeline gateway` or `beeline router`.
FROM python:3.11-slim
RUN useradd --uid 10001 --create-home beeline
WORKDIR /app
# Locked, hash-checked dependencies first (their layer is cached while only the code changes).
COPY requirements/runtime.txt requirements/build.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/build.txt -r requirements/runtime.txt
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY gateway ./gateway
COPY router ./router
COPY beeline ./beeline
RUN pip install --no-cache-dir --no-deps --no-build-isolation .
USER 10001
EXPOSE 8080 8090
CMD ["beeline", "gateway"]
