# Stand-in for postgres:16, built by ./dev compose-smoke where Docker Hub cannot be reached:
# Debian bookworm's PostgreSQL (15) with an entry point honouring what docker-compose.yml uses of
# the official image: POSTGRES_USER/PASSWORD/DB, data in /var/lib/postgresql/data, pg_isready.
ARG DEBIAN_IMAGE=localhost/recap-standin/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
EXPOSE 5432
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
