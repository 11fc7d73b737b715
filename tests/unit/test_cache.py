"""The watch-fed cache: what it keeps of an object, and that an older version never replaces a newer one."""

from __future__ import annotations

import copy

from flownexus.runtime.cache import LAST_APPLIED, Cache, slim


def job(rv: str, name: str = "digits-a1", namespace: str = "default") -> dict[str, object]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": rv, "uid": "u1",
                     "managedFields": [{"manager": "x"}], "annotations": {LAST_APPLIED: "{}", "keep": "me"}},
        "spec": {"parallelism": 2, "suspend": False, "template": {"spec": {"containers": []}}},
        "status": {"ready": 2},
    }  # fmt: skip


def test_slim_drops_only_what_no_pass_reads_and_leaves_the_input_alone() -> None:
    original = job("5")
    before = copy.deepcopy(original)
    kept = slim(original)
    assert original == before
    assert "managedFields" not in kept["metadata"] and kept["metadata"]["annotations"] == {"keep": "me"}  # type: ignore[index]
    assert kept["spec"] == {"parallelism": 2, "suspend": False} and kept["status"] == {"ready": 2}


def test_an_older_version_never_replaces_a_newer_one() -> None:
    cache = Cache()
    assert cache.upsert(job("7"))
    assert not cache.upsert(job("6"))  # a late watch event after our own write-through
    assert cache.get("Job", "default", "digits-a1")["metadata"]["resourceVersion"] == "7"  # type: ignore[index]


def test_list_is_per_namespace_and_replace_kind_drops_what_is_gone() -> None:
    cache = Cache()
    cache.replace_kind("Job", [job("1", "a"), job("1", "b", "other")], listed_at=1)
    assert [o["metadata"]["name"] for o in cache.list("Job", "default")] == ["a"]
    assert len(cache.list("Job")) == 2
    cache.replace_kind("Job", [job("2", "b", "other")], listed_at=2)
    assert cache.get("Job", "default", "a") is None


def test_a_relist_drops_objects_deleted_unseen_but_keeps_what_the_watch_saw_after_the_list() -> None:
    cache = Cache()
    cache.replace_kind("Job", [job("5", "ghost"), job("5", "kept")], listed_at=5)
    cache.upsert(job("9", "born-after-the-list"))
    cache.upsert(job("12", "kept"))  # the watch brought a newer version than the list will have
    gone = cache.replace_kind("Job", [job("8", "kept")], listed_at=10)
    assert sorted(gone) == [("Job", "default", "born-after-the-list"), ("Job", "default", "ghost")]
    assert cache.get("Job", "default", "ghost") is None
    assert cache.get("Job", "default", "kept")["metadata"]["resourceVersion"] == "12"  # type: ignore[index]
    born = cache.get("Job", "default", "born-after-the-list")
    assert born is None  # created at 9 < 10 and absent from the list: deleted before the list was served
    cache.upsert(job("11", "newer"))
    cache.replace_kind("Job", [job("8", "kept")], listed_at=10)
    assert cache.get("Job", "default", "newer") is not None  # created after the list was served: kept
