"""Dask distributed for the filter stage: join a scheduler, or start a LocalCluster sized to the machine."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

ENV_ADDRESS = "RECAP_DASK_ADDRESS"

log = logging.getLogger(__name__)


@contextlib.contextmanager
def dask_client(address: str | None = None, *, workers: int | None = None) -> Iterator[tuple[object, int]]:
    """(client, threads per worker model): a Client of `address` (or $RECAP_DASK_ADDRESS), else of a LocalCluster.

    The LocalCluster has one single-threaded worker process per core (models are not thread-safe
    and each holds its own onnxruntime/torch threads); worker processes start with spawn, which
    deltalake needs (it panics in forked children).
    """
    from distributed import Client, LocalCluster

    address = address or os.environ.get(ENV_ADDRESS) or None
    if address:
        log.info("filter: joining Dask scheduler %s", address)
        client = Client(address, timeout="30s")
        try:
            yield client, 1  # a shared cluster's workers are sized by whoever runs it
        finally:
            client.close()
        return
    n = workers or os.cpu_count() or 1
    log.info("filter: starting a LocalCluster of %d worker processes", n)
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        yield client, max(1, (os.cpu_count() or 1) // n)
