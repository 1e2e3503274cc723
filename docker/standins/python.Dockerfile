# Stand-in for python:3.11-slim-bookworm, built by ./dev compose-smoke where Docker Hub cannot be
# reached: Debian bookworm's own Python 3.11 with venv, `python` on PATH like the official image.
# The base is a bookworm root filesystem made with debootstrap (docker/compose_smoke.py).
ARG DEBIAN_IMAGE=localhost/recap-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
CMD ["python3"]
