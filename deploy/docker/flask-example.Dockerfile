# syntax=docker/dockerfile:1
# The Flask example (examples/flask) under gunicorn: the app container beside stickless in
# deploy/kubernetes/. It listens on 127.0.0.1 only: in a pod, only stickless can reach it.
#
#   docker build -f deploy/docker/flask-example.Dockerfile -t stickless-flask-example .

FROM python:3.12-slim-bookworm
WORKDIR /app
COPY examples/flask/requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt gunicorn
COPY examples/flask/app.py .
USER 65532:65532
CMD ["gunicorn", "--bind", "127.0.0.1:5000", "--workers", "2", "--worker-tmp-dir", "/tmp", "app:app"]
