# The image the k8s/ manifests run (generalmodel:0.1.0): Python 3.11, CUDA PyTorch from PyPI (the
# version the Makefile pins), this package with its GPU, HF and tune (optuna) extras, and Ray
# pinned to k8s/base/raycluster.yaml's rayVersion.
#   docker build -t generalmodel:0.1.0 .
FROM python:3.11-slim

RUN useradd --uid 1000 --create-home ray
WORKDIR /app
COPY pyproject.toml README.md ./
COPY generalmodel generalmodel
COPY models models
COPY jobs jobs
COPY configs configs
COPY sweeps sweeps
RUN pip install --no-cache-dir "torch==2.13.0" \
 && pip install --no-cache-dir ".[gpu,hf,tune]" "ray[default,data,train,tune,serve]==2.60.0" \
 && chown -R 1000:1000 /app
USER 1000
ENV PYTHONUNBUFFERED=1
