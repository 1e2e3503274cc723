"""recap_pipeline's dry run under dag.test(): plans work units, renders the pod, writes nothing."""

from tests.dags.conftest import dag_test


def test_dry_run_plans_and_renders_without_writing(airflow_env, tmp_path, sample_shards, tiny_model):
    conf = {"source": f"{sample_shards}/*.tar", "lake": str(tmp_path / "lake"), "model": str(tiny_model),
            "runner": "kubernetes", "dry_run": True, "shard_limit": 1}
    result, logs = dag_test("recap_pipeline", conf, airflow_env, timeout=600)
    assert result["state"].endswith("success"), result
    assert result["tasks"]["plan[-1]"] == "success"
    skipped = {t for t, s in result["tasks"].items() if s.endswith("skipped")}
    assert {"ingest[-1]", "validate[-1]", "publish[-1]", "report[-1]"} <= skipped
    assert "nvidia.com/gpu" in logs and "shards/00000.tar" in logs  # the rendered pod of the first unit
    assert "00001.tar" not in logs.split("work units:")[1].split("]]")[0]  # shard_limit=1
    assert not (tmp_path / "lake").exists()


def test_bad_source_or_model_fails_in_plan_at_once(airflow_env, tmp_path, sample_shards, tiny_model):
    """User errors stop the run in `plan`, before anything is written, without retries."""
    cases = [({"source": str(tmp_path / "typo"), "model": str(tiny_model)}, "source not found"),
             ({"source": str(sample_shards), "model": str(tmp_path / "no-model")}, "no such folder")]
    for conf, message in cases:
        conf = {**conf, "lake": str(tmp_path / "lake"), "runner": "local"}
        result, logs = dag_test("recap_pipeline", conf, airflow_env, timeout=600)
        assert result["state"].endswith("failed"), result
        assert result["tasks"]["plan[-1]"].endswith("failed"), result  # failed, not up_for_retry
        assert message in logs
        assert not (tmp_path / "lake").exists()


def test_unconfigured_incremental_dag_skips(airflow_env, tmp_path):
    env = {**airflow_env, "RECAP_INCREMENTAL_SOURCE": "", "RECAP_MODEL": ""}
    result, logs = dag_test("recap_incremental", {"lake": str(tmp_path / "lake")}, env, timeout=600)
    assert result["tasks"]["find_new_shards[-1]"].endswith("skipped"), result
    assert not result["state"].endswith("failed"), result
    assert "recap_incremental is not configured" in logs


def test_metadata_source_is_downloaded_then_recaptioned(airflow_env, tmp_path, tiny_model):
    """Source kind `metadata`: the download task fetches the URLs (a local server) into shards under
    LAKE/_downloads, and the run publishes them with their source uids."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from tests.helpers import REPO, jpeg
    from tests.http_server import ImageServer

    config = tmp_path / "config.yaml"
    config.write_text((REPO / "tests" / "tiny-model.yaml").read_text() + "download:\n  allow_private_networks: true\n")
    with ImageServer({f"{i}.jpg": jpeg(320, 240, (50 * i, 90, 30)) for i in range(3)}) as server:
        meta = tmp_path / "meta" / "part-0.parquet"
        meta.parent.mkdir()
        pq.write_table(pa.table({"uid": ["a1", "b2", "c3", "d4"],
                                 "url": [server.url(f"img/{i}.jpg") for i in range(3)] + [server.url("missing")],
                                 "text": ["a red square on a plain background"] * 4}), meta)
        conf = {"source": str(meta.parent), "source_kind": "metadata", "lake": str(tmp_path / "lake"),
                "model": str(tiny_model), "runner": "local"}
        result, logs = dag_test("recap_pipeline", conf, {**airflow_env, "RECAP_CONFIG": str(config)}, timeout=900)
    assert result["state"].endswith("success"), (result, logs[-3000:])
    assert result["tasks"]["download[0]"] == "success" and "download[1]" not in result["tasks"]
    published = DeltaTable(str(tmp_path / "lake" / "recap")).to_pandas()
    assert sorted(published["source_uid"]) == ["a1", "b2", "c3"]
    assert len(list((tmp_path / "lake" / "_downloads").glob("part-0-*/00000_stats.json"))) == 1


def test_a_run_with_nothing_new_publishes_nothing_and_says_so(airflow_env, tmp_path, tiny_model):
    """Issue 19, 6: when validate finds nothing to check (here every sample lacks its image, so
    ingest rejects all), it writes no batch, `publish` skips and `report` says there was nothing
    new; the run succeeds."""
    import json

    from tests.helpers import REPO, write_tar

    config = tmp_path / "config.yaml"
    config.write_text((REPO / "tests" / "tiny-model.yaml").read_text())
    write_tar(tmp_path / "src" / "00000.tar", [(f"00000000{i}.{ext}", data) for i in range(2) for ext, data in
                                               (("txt", b"a caption without its image"),
                                                ("json", json.dumps({"key": f"00000000{i}"}).encode()))])
    conf = {"source": str(tmp_path / "src"), "lake": str(tmp_path / "lake"), "model": str(tiny_model),
            "runner": "local"}
    result, logs = dag_test("recap_pipeline", conf, {**airflow_env, "RECAP_CONFIG": str(config)}, timeout=600)
    assert result["state"].endswith("success"), (result, logs[-3000:])
    tasks = result["tasks"]
    assert tasks["validate[-1]"] == "success" and tasks["report[-1]"] == "success", tasks
    assert tasks["publish[-1]"].endswith("skipped"), tasks
    assert "nothing to publish: nothing to validate in" in logs and "nothing new in run" in logs
    assert not list((tmp_path / "lake").glob("_batches/*")) and not (tmp_path / "lake" / "recap").exists()
