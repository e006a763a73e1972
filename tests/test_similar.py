"""Vectors, tags and similar tracks of the catalog: embeddings per snapshot, the faiss index, neighbour lists (full and
incremental), a version 2 store upgraded, and the `similar` verb."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import cli, keep_pristine, make_library, restored
from test_catalog import SPACE, rows

from genre_batch import GenreBatchError
from genre_batch.analysis.audio import SAMPLE_RATE
from genre_batch.cluster import session
from genre_batch.library.synth import render, write_audio
from genre_batch.publishing import catalog, query, similar, vectors
from genre_batch.publishing.pointer import SimilarRecord, SpaceRecord, published
from genre_batch.stages import extract as extract_stage
from genre_batch.stages import runs
from genre_batch.stages import tag as tag_stage
from genre_batch.stages import train as train_stage
from genre_batch.storage.store import Store


def lists(s: Store, info: SimilarRecord | None = None) -> dict[str, list[tuple[str, float]]]:
    """The published (or an `info`'s: what similar.build returns, parsed) similar table as track_id -> [(neighbour_id,
    score)] by rank."""
    info = info or published(s).similar
    table = pa.concat_tables([s.read_table(f"{s.catalog}/{f}") for f in info.files]).sort_by([("track_id", "ascending"), ("rank", "ascending")])
    out: dict[str, list[tuple[str, float]]] = {}
    for row in table.to_pylist():
        out.setdefault(row["track_id"], []).append((row["neighbour_id"], row["score"]))
    return out


def same_lists(a: dict, b: dict) -> None:
    """Equal neighbour lists: same neighbours in the same order, scores equal to float32 rounding."""
    assert a.keys() == b.keys()
    for track in a:
        assert [n for n, _ in a[track]] == [n for n, _ in b[track]], track
        assert [s for _, s in a[track]] == pytest.approx([s for _, s in b[track]], abs=1e-5)


def exact_lists(table: pa.Table, k: int) -> dict[str, list[str]]:
    """Brute-force top-k neighbours (cosine) of a catalog table's tracks, self excluded."""
    ids = table["track_id"].to_pylist()
    x = similar.as_matrix(table["embedding"])
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    return {t: [ids[j] for j in np.argsort(-scores[i], kind="stable")[:k]] for i, t in enumerate(ids)}


# ---------------------------------------------------------------------------------------------------------------
# In process: catalog.publish of tables with given embeddings
# ---------------------------------------------------------------------------------------------------------------


def test_similar_table_is_the_exact_top_k(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    table = rows(60, "rock", "run-a")  # nlist 31 <= nprobe 32: the IVF search is exhaustive
    pointer = catalog.publish(s, table, "run-a", "m-1", SPACE)
    assert pointer.similar.k == catalog.SIMILAR_K and pointer.similar.nlist == 31 and pointer.similar.mode == "full"
    got = lists(s)
    assert {t: [n for n, _ in v] for t, v in got.items()} == exact_lists(table, catalog.SIMILAR_K)
    assert all(len(v) == catalog.SIMILAR_K for v in got.values())
    assert all(a >= b for v in got.values() for (_, a), (_, b) in zip(v, v[1:]))  # rank 1 nearest
    assert pointer.document["vector_space"] == SPACE and pointer.vector_space == SpaceRecord.parse(SPACE)
    assert (pointer.vector_space.name, pointer.vector_space.dim, pointer.vector_space.file) == ("test-space", catalog.VECTOR_DIM, "spaces/test-space.npz")


def test_the_index_trains_on_a_seeded_sample_and_holds_every_track(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past TRAIN_PER_LIST vectors per cell the cells' k-means trains on a seeded sample spread over the snapshot's
    row groups; the index still holds every track. A task writing the next snapshot first drops the id map that list
    tasks keep in their process."""
    assert [r.tolist() for r in similar.training_rows([3, 5, 4], 2)] == [[0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 3]]  # 128 >= 12: all
    monkeypatch.setattr(similar, "TRAIN_PER_LIST", 1)
    picked = similar.training_rows([30, 50, 40], 10)
    assert sum(len(r) for r in picked) == 10 and sum(len(r) > 0 for r in picked) >= 2
    assert all(np.all(np.diff(r) > 0) and np.all((r >= 0) & (r < n)) for r, n in zip(picked, [30, 50, 40]))
    assert [r.tolist() for r in picked] == [r.tolist() for r in similar.training_rows([30, 50, 40], 10)]  # seeded

    s = Store(str(tmp_path))
    table = pa.concat_tables([rows(40, "rock", "run-a"), rows(60, "jazz", "run-a").slice(40)])  # two files
    pointer = catalog.publish(s, table, "run-a", "m-1", SPACE)  # 31 lists trained on 31 of the 60 vectors
    index = similar.open_index(s, pointer.similar)
    assert (index.ntotal, index.nlist) == (60, 31)
    assert {t: [n for n, _ in v] for t, v in lists(s).items()} == exact_lists(table, catalog.SIMILAR_K)  # nprobe >= nlist
    assert similar._ID_MAP  # the list tasks (here, in process) keep the id map
    assert similar.write_cells(s, similar.folder("next"), similar.units_of(s, pointer.files)) == 31
    assert not similar._ID_MAP  # a task writing the next snapshot drops it first


def test_buckets_are_contiguous_cell_ranges_of_about_equal_tracks() -> None:
    counts = np.array([5, 0, 7, 3, 3, 2, 0, 9, 1, 10])  # 40 tracks in 10 cells
    bounds = similar.bounds_for(counts, 4)
    assert bounds[0] == 0 and bounds[-1] == 10 and len(bounds) == 5 and all(a < b for a, b in zip(bounds, bounds[1:]))
    per_bucket = [int(counts[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
    assert sum(per_bucket) == 40 and max(per_bucket) <= 10 + 9  # each at most a quarter plus its last cell
    assert similar.bucket_of(np.arange(10), bounds).tolist() == [b for b, (lo, hi) in enumerate(zip(bounds, bounds[1:])) for _ in range(lo, hi)]
    assert similar.bounds_for(np.array([0, 100, 0, 0]), 3) == [0, 2, 3, 4]  # one cell holds everything: every bucket still has a cell
    assert similar.bounds_for(np.array([4, 4]), 5) == [0, 1, 2]  # never more buckets than cells


def test_the_stacked_parts_search_as_one_index_of_the_same_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nlist > nprobe (a real approximate search) and several buckets, the lists search the index parts stacked
    into one: the same neighbours and scores as one IVFFlat index of the same cells holding every track."""
    import faiss

    monkeypatch.setattr(similar, "BUCKET_TRACKS", 400)
    x = np.random.default_rng(3).standard_normal((2000, catalog.VECTOR_DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    table = with_embeddings(rows(2000, "rock", "run-a"), x)
    s = Store(str(tmp_path))
    info = catalog.publish(s, table, "run-a", "m-1", SPACE).similar
    assert info.nlist == 179 > similar.NPROBE and info.buckets == 5 and len(info.index_parts) == 5 and info.index_file is None
    cells = similar.read_cells(s, info.folder)
    single = faiss.IndexIVFFlat(cells, catalog.VECTOR_DIM, cells.ntotal, faiss.METRIC_INNER_PRODUCT)
    single.add_with_ids(x, similar.vector_ids(table["track_id"].to_pylist()))
    single.nprobe = similar.NPROBE
    stacked = similar.open_index(s, info)
    assert stacked.ntotal == 2000
    expected, got = single.search(x[:300], 21), stacked.search(x[:300], 21)
    assert np.array_equal(expected[1], got[1]) and np.allclose(expected[0], got[0])
    ids = table["track_id"].to_pylist()
    by_vid = dict(zip(similar.vector_ids(ids).tolist(), ids))
    stored = lists(s)
    for i in range(300):  # the stored lists are those searches, the track itself left out
        assert [n for n, _ in stored[ids[i]]] == [by_vid[v] for v in expected[1][i] if v != similar.vector_ids([ids[i]])[0]][: catalog.SIMILAR_K]


@pytest.mark.parametrize("previous", ["deep lists", "no spare (a list that lost a member is queried)"])
def test_incremental_update_equals_a_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: str) -> None:
    if previous.startswith("no spare"):
        monkeypatch.setattr(similar, "SPARE", 0)
    s = Store(str(tmp_path / "nightly"))
    catalog.publish(s, rows(60, "rock", "run-a"), "run-a", "m-1", SPACE)  # nlist 31 <= nprobe: exhaustive search
    # the next night: t0 removed, t60 and t61 added, t10 changed (new content: near t50's vector, a new fingerprint)
    second = rows(62, "rock", "run-b")
    second = second.filter(pc.not_equal(second["track_id"], "t0"))
    ids = second["track_id"].to_pylist()
    embedding = second["embedding"].combine_chunks()
    near_50 = np.array(embedding[ids.index("t50")].as_py()) + 0.01 * np.array(embedding[ids.index("t10")].as_py())
    changed = [(near_50 / np.linalg.norm(near_50)).tolist() if t == "t10" else embedding[i].as_py() for i, t in enumerate(ids)]
    second = second.set_column(second.schema.get_field_index("embedding"), "embedding", pa.array(changed, embedding.type))
    second = second.set_column(2, "fingerprint", pa.array(["new" if t == "t10" else f for t, f in zip(ids, second["fingerprint"].to_pylist())]))
    pointer = catalog.publish(s, second, "run-b", "m-1", SPACE)
    assert (pointer.similar.mode, pointer.similar.added, pointer.similar.removed) == ("incremental", 3, 2)
    rebuilt = Store(str(tmp_path / "rebuilt"))
    assert catalog.publish(rebuilt, second, "run-b", "m-1", SPACE).similar.mode == "full"
    same_lists(lists(s), lists(rebuilt))
    assert {t: [n for n, _ in v] for t, v in lists(s).items()} == exact_lists(second, catalog.SIMILAR_K)
    assert lists(s)["t10"][0][0] == "t50" and lists(s)["t10"][0][1] > 0.99  # a changed track finds the track it now sounds like
    assert all(n != "t0" for v in lists(s).values() for n, _ in v)  # the departed track is in no list
    deep = s.read_table(f"{s.catalog}/{similar.deep_piece(pointer.similar.folder, 0)}")  # what the next night reads
    assert pointer.similar.deep == similar.DEEP_VERSION and deep.num_rows == 61
    by_vid = {v: (n, f) for v, n, f in zip(deep["vid"].to_pylist(), deep["neighbours"].to_pylist(), deep["floor"].to_pylist())}
    ids, x = second["track_id"].to_pylist(), similar.as_matrix(second["embedding"])
    for i in (5, 10, 60):  # kept (it lost t0 and t10), changed, added: the top of the exact scores down to the floor
        neighbours, floor = by_vid[int(similar.vector_ids([ids[i]])[0])]
        scores = np.delete(x @ x[i], i)
        assert catalog.SIMILAR_K <= len(neighbours) <= catalog.SIMILAR_K + similar.SPARE and (scores > floor + 1e-6).sum() <= len(neighbours)
        assert neighbours == similar.vector_ids([ids[j] for j in np.argsort(-(x @ x[i]), kind="stable")[1 : len(neighbours) + 1]]).tolist()


@pytest.mark.parametrize("bucket_tracks, mode", [(30, "incremental"), (25, "full")])
def test_a_bucket_grown_past_twice_its_size_makes_the_next_snapshot_a_rebuild(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                              bucket_tracks: int, mode: str) -> None:
    s = Store(str(tmp_path))
    monkeypatch.setattr(similar, "BUCKET_TRACKS", 60)
    assert catalog.publish(s, rows(60, "rock", "run-a"), "run-a", "m-1", SPACE).similar.sizes == [60]
    monkeypatch.setattr(similar, "BUCKET_TRACKS", bucket_tracks)  # 60 <= 2 x 30: kept; 60 > 2 x 25: rebuilt, in 3 buckets
    night = catalog.publish(s, rows(61, "rock", "run-b"), "run-b", "m-1", SPACE).similar
    assert night.mode == mode and night.buckets == (1 if mode == "incremental" else 3) and sum(night.sizes) == 61


def test_nightly_files_equal_what_a_rebuild_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(similar, "BUCKET_TRACKS", 20)  # 3 buckets, row groups of 8 rows: the night's merges cross them
    monkeypatch.setattr(similar, "ROW_GROUP", 8)
    monkeypatch.setattr(similar, "LOOKUP_TRACKS", 16)  # 4 lookup partitions, kept by the night
    s = Store(str(tmp_path / "nightly"))
    first = catalog.publish(s, rows(60, "rock", "run-a"), "run-a", "m-1", SPACE).similar  # nlist 31 <= nprobe: exhaustive search
    second = rows(64, "rock", "run-b")  # t0 and t33 leave, t60..t63 arrive; t7 moves to another uri (same content)
    second = second.filter(pc.invert(pc.is_in(second["track_id"], pa.array(["t0", "t33"]))))
    second = second.set_column(1, "uri", pa.array(["/music/moved.mp3" if t == "t7" else u for t, u in zip(second["track_id"].to_pylist(), second["uri"].to_pylist())]))
    night = catalog.publish(s, second, "run-b", "m-1", SPACE).similar
    assert (night.mode, night.added, night.removed, night.buckets) == ("incremental", 4, 2, 3)
    assert night.bounds == first.bounds and s.fs.cat_file(f"{s.catalog}/{night.cells}") == s.fs.cat_file(f"{s.catalog}/{first.cells}")
    rebuilt = Store(str(tmp_path / "rebuilt"))
    full = catalog.publish(rebuilt, second, "run-b", "m-1", SPACE).similar
    same_lists(lists(s), lists(rebuilt))
    for column in ("vid", "uri"):  # the lookups: the same rows in the same order (cells aside: the night's are the first night's)
        before = pa.concat_tables([s.read_table(f"{s.catalog}/{f}") for f in night.lookup[column]])
        after = pa.concat_tables([rebuilt.read_table(f"{rebuilt.catalog}/{f}") for f in full.lookup[column]])
        assert before.select(["vid", "uri"]).equals(after.select(["vid", "uri"])) and before.schema == after.schema
    assert len(night.lookup["vid"]) == len(night.lookup["uri"]) == len(first.lookup["vid"]) == 4
    for column, files in night.lookup.items():  # each partition holds the keys of its range
        for p, f in enumerate(files):
            keys = similar.lookup_keys(column, s.read_table(f"{s.catalog}/{f}")[column].to_pylist())
            assert len(keys) and (similar.partition_of(keys, 4) == p).all()
    by_vid = pa.concat_tables([s.read_table(f"{s.catalog}/{f}") for f in night.lookup["vid"]])
    assert by_vid["vid"].to_pylist() == sorted(similar.vector_ids(by_vid["track_id"].to_pylist()).tolist())  # partitions in order: vid order
    # the vectors parts: every track once, with its embedding and its cell (the night's tracks assigned by the first
    # night's cells), in its cell's bucket, in vid order
    ids, x = second["track_id"].to_pylist(), similar.as_matrix(second["embedding"])
    cells = similar.assign(similar.read_cells(s, night.folder), x)
    assert dict(zip(by_vid["track_id"].to_pylist(), by_vid["cell"].to_pylist())) == dict(zip(ids, cells.tolist()))
    seen = []
    for bucket, f in enumerate(night.vectors_parts):
        vectors = pq.ParquetFile(f"{s.catalog}/{f}")
        table = vectors.read()
        assert table["vid"].to_pylist() == sorted(table["vid"].to_pylist())
        assert all(night.bounds[bucket] <= c < night.bounds[bucket + 1] for c in table["cell"].to_pylist())
        assert np.array_equal(similar.as_matrix(table["embedding"]), x[[ids.index(t) for t in table["track_id"].to_pylist()]])
        assert table["cell"].to_pylist() == cells[[ids.index(t) for t in table["track_id"].to_pylist()]].tolist()
        assert vectors.metadata.row_group(0).column(3).compression == "UNCOMPRESSED"
        assert vectors.schema_arrow.field("embedding").type == pa.binary(4 * catalog.VECTOR_DIM)
        assert vectors.schema_arrow.metadata[b"genre_batch.vectors_version"] == str(similar.VECTORS_VERSION).encode()
        seen += table["track_id"].to_pylist()
    assert sorted(seen) == sorted(ids)
    assert not [p for p in Path(s.catalog, night.folder).iterdir() if p.name.startswith("_")]  # routed and added files are gone
    for f in night.files:  # the pieces: in (track_id, rank) order
        piece = s.read_table(f"{s.catalog}/{f}")
        keys = list(zip(piece["track_id"].to_pylist(), piece["rank"].to_pylist()))
        assert keys == sorted(keys)


def with_embeddings(table: pa.Table, matrix: np.ndarray) -> pa.Table:
    """A catalog table with its embeddings replaced (rows of `matrix`, float32)."""
    column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.astype(np.float32).reshape(-1)), catalog.VECTOR_DIM)
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", column)


def isolated_and_cluster() -> np.ndarray:
    """62 unit vectors: t0 isolated (e0), t1..t59 a tight cluster around e1, t60 (added in the night) in the cluster
    but tilted towards t0 (cosine ~0.48 with t0, ~0.77 with its nearest cluster members), and t61: t30's new
    content in the night, slightly moved."""
    rng = np.random.default_rng(5)
    noise = rng.standard_normal((59, catalog.VECTOR_DIM)) * 0.6 / np.sqrt(catalog.VECTOR_DIM)
    noise[:, 1] = 0
    basis = np.eye(catalog.VECTOR_DIM)
    matrix = np.vstack([basis[0], basis[1] + noise, basis[1] + 0.55 * basis[0], basis[1] + noise[29] + 0.2 * basis[2]])
    return (matrix / np.linalg.norm(matrix, axis=1, keepdims=True)).astype(np.float32)


def night_of_the_cluster(tmp_path: Path) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Publish isolated_and_cluster's t0..t59, then the night that adds t60 and changes t30's content (to row 61);
    returns the nightly lists, a rebuild's, the night's exact cosines [61, 61] and each track's floor before it."""
    matrix = isolated_and_cluster()
    s = Store(str(tmp_path / "nightly"))
    catalog.publish(s, with_embeddings(rows(60, "rock", "run-a"), matrix[:60]), "run-a", "m-1", SPACE)  # nlist 31 <= nprobe: exhaustive
    second = with_embeddings(rows(61, "rock", "run-b"), np.vstack([matrix[:30], matrix[61:], matrix[31:61]]))
    second = second.set_column(2, "fingerprint", pa.array(["new" if t == "t30" else f for t, f in zip(second["track_id"].to_pylist(), second["fingerprint"].to_pylist())]))
    night = catalog.publish(s, second, "run-b", "m-1", SPACE).similar
    assert (night.mode, night.added, night.removed) == ("incremental", 2, 1)
    rebuilt = Store(str(tmp_path / "rebuilt"))
    catalog.publish(rebuilt, second, "run-b", "m-1", SPACE)
    before = matrix[:60] @ matrix[:60].T
    np.fill_diagonal(before, -np.inf)
    x = similar.as_matrix(second["embedding"])
    cosines = x @ x.T
    np.fill_diagonal(cosines, -np.inf)
    return lists(s), lists(rebuilt), cosines, -np.sort(-before, axis=1)[:, catalog.SIMILAR_K + similar.SPARE - 1]


def test_an_added_track_enters_every_list_whose_floor_it_reaches(tmp_path: Path) -> None:
    nightly, rebuilt, cosines, floors = night_of_the_cluster(tmp_path)
    assert cosines[60, 0] < np.delete(cosines[60], [0, 60]).min() and cosines[60, 0] > floors[0]  # t0: t60's farthest track
    assert nightly["t0"][0][0] == "t60" and nightly["t0"][0][1] == pytest.approx(cosines[60, 0], abs=1e-5)
    reached = {f"t{x}" for x in range(60) if cosines[60, x] >= floors[x]}  # the lists the reverse scan gives t60 to
    assert {"t0"} < {t for t, v in nightly.items() if "t60" in [n for n, _ in v]} - {"t30"} <= reached
    same_lists(nightly, rebuilt)


def test_a_changed_track_leaves_the_lists_and_enters_again_once_with_its_new_score(tmp_path: Path) -> None:
    nightly, rebuilt, cosines, _ = night_of_the_cluster(tmp_path)
    holding = [t for t, v in nightly.items() if "t30" in [n for n, _ in v]]
    assert len(holding) > 1
    for t in holding:
        assert [n for n, _ in nightly[t]].count("t30") == 1
        assert dict(nightly[t])["t30"] == pytest.approx(cosines[int(t[1:]), 30], abs=1e-5)  # the new content's score
    assert all(len({n for n, _ in v}) == len(v) for v in nightly.values())
    same_lists(nightly, rebuilt)
    found, scores, held = similar.top_per_row((np.array([0, 0, 0, 1]), np.array([7, 5, -1, 7]), np.array([0.4, 0.4, 0.9, 0.3], np.float32)), 2, 1)
    assert found.tolist() == [[5], [7]] and scores.ravel().tolist() == pytest.approx([0.4, 0.3]) and held.tolist() == [2, 1]  # ties by vid


def test_a_new_vector_space_rebuilds(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    catalog.publish(s, rows(50, "rock", "run-a"), "run-a", "m-1", SPACE)
    pointer = catalog.publish(s, rows(51, "rock", "run-b"), "run-b", "m-1", {**SPACE, "name": "another-space"})
    assert pointer.similar.mode == "full" and pointer.vector_space.name == pointer.space_name == "another-space"


def test_similar_answers_from_the_lookup_files_and_without_them(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    table = pa.concat_tables([rows(40, "rock", "run-a"), rows(60, "jazz", "run-a").slice(40)])  # t40..t59 jazz; nlist 31: exhaustive
    pointer = catalog.publish(s, table, "run-a", "m-1", SPACE)
    small = {"row_group": similar.LOOKUP_ROW_GROUP, "piece": similar.PIECE_ROW_GROUP, "tracks": similar.LOOKUP_TRACKS}
    similar.LOOKUP_ROW_GROUP, similar.PIECE_ROW_GROUP, similar.LOOKUP_TRACKS = 4, 40, 30  # 2 partitions, several row groups each: the lookups must pick the right ones
    try:
        pointer = catalog.publish(s, table, "run-b", "m-1", {**SPACE, "name": "rebuilt-with-small-row-groups"})
    finally:
        similar.LOOKUP_ROW_GROUP, similar.PIECE_ROW_GROUP, similar.LOOKUP_TRACKS = small["row_group"], small["piece"], small["tracks"]
    by_vid = [pq.ParquetFile(f"{s.catalog}/{f}").metadata for f in pointer.similar.lookup["vid"]]
    assert len(by_vid) == 2 and all(m.num_row_groups > 3 for m in by_vid) and sum(m.num_rows for m in by_vid) == 60
    exact = exact_lists(table, 59)
    names = [("t7", "t7"), ("/music/45.mp3", "/music/45.mp3")]
    with_lookup = similar.answer(s, names, 5, None) + similar.answer(s, names, 10, "jazz")
    assert [a.source for a in with_lookup] == ["table", "table", "index", "index"]
    assert [n["track_id"] for n in with_lookup[0].neighbours] == exact["t7"][:5]
    assert [n["track_id"] for n in with_lookup[1].neighbours] == exact["t45"][:5] and with_lookup[1].genre == "jazz"
    assert [n["track_id"] for n in with_lookup[3].neighbours] == [t for t in exact["t45"] if int(t[1:]) >= 40][:10]
    assert all(n["genre"] == "jazz" and n["uri"] == f"/music/{n['track_id'][1:]}.mp3" for n in with_lookup[2].neighbours)


def old_store_answers(s: Store) -> list[similar.Answer]:
    """What the tests of stores of earlier versions ask `similar`: t7 and /music/45.mp3 (top 5; then top 10 of genre
    jazz) and t3 past K (top 25)."""
    names = [("t7", "t7"), ("/music/45.mp3", "/music/45.mp3")]
    return similar.answer(s, names, 5, None) + similar.answer(s, names, 10, "jazz") + similar.answer(s, [("t3", "t3")], 25, None)


def assert_exact(answers: list[similar.Answer], table: pa.Table) -> None:
    """old_store_answers of a store holding `table` (t0..t39 rock, the rest jazz) are the exact neighbours, from the
    stored lists where they can be, from the index past K or within a genre."""
    exact = exact_lists(table, table.num_rows - 1)
    assert [a.source for a in answers] == ["table", "table", "index", "index", "index"]
    assert [n["track_id"] for n in answers[0].neighbours] == exact["t7"][:5]
    assert [n["track_id"] for n in answers[1].neighbours] == exact["t45"][:5] and answers[1].genre == "jazz"
    assert [n["track_id"] for n in answers[3].neighbours] == [t for t in exact["t45"] if int(t[1:]) >= 40][:10]
    assert [n["track_id"] for n in answers[4].neighbours] == exact["t3"][:25]  # past K: the track's vector searched in the index


LAYOUT_1 = Path(__file__).parent / "data" / "store-layout-1"
"""A store as genre-batch 8225ea5 published it (similar layout 1: one index.faiss, one vectors.parquet, buckets by vid
hash; BUCKET_TRACKS 25): test_similar_answers_from_the_lookup_files's table, t0..t39 rock and t40..t59 jazz. Its
`vector_space` is test_catalog.SPACE (the test stand-in then recorded only name and dim)."""


def test_a_snapshot_of_layout_1_is_answered_and_the_next_snapshot_is_a_full_build(tmp_path: Path) -> None:
    shutil.copytree(LAYOUT_1, tmp_path / "store")
    s = Store(str(tmp_path / "store"))
    table = pa.concat_tables([rows(40, "rock", "run-a"), rows(60, "jazz", "run-a").slice(40)])
    pointer = published(s)
    info = pointer.similar
    assert "layout" not in pointer.document["similar"] and info.layout == 1 and info.buckets == 3 and info.bounds is None
    assert Path(s.catalog, info.index_file).is_file() and Path(s.catalog, info.vectors_file).is_file() and info.index_parts == info.vectors_parts == []
    answers = old_store_answers(s)
    assert_exact(answers, table)
    # a snapshot published before the lookup files existed: the same answers, by a scan of the catalog
    assert [len(files) for files in info.lookup.values()] == [1, 1]  # one file each (a string in CURRENT.json)
    for files in info.lookup.values():
        s.fs.rm_file(f"{s.catalog}/{files[0]}")
    old = {**pointer.document, "similar": {k: v for k, v in pointer.document["similar"].items() if k != "lookup"}}
    catalog.promote(s, old, s.version_token(f"{s.catalog}/{catalog.POINTER}"))
    assert old_store_answers(s) == answers
    # the next snapshot, same tracks and space: built afresh in layout 2 (an update needs the previous cells and parts)
    night = catalog.publish(s, table, "run-b", "m-1", SPACE).similar
    assert (night.layout, night.mode) == (similar.LAYOUT, "full")
    assert {t: [n for n, _ in v] for t, v in lists(s).items()} == exact_lists(table, catalog.SIMILAR_K)
    assert old_store_answers(s) == answers


ONE_LOOKUP_FILE = Path(__file__).parent / "data" / "store-layout-2-one-lookup-file"
"""A store as genre-batch a1ba515 published it (similar layout 2, one lookup file by vid and one by uri, not
partitions; BUCKET_TRACKS 25): the same table as LAYOUT_1's, the same `vector_space`."""


def test_a_snapshot_with_one_lookup_file_is_answered_and_updated_in_one_partition(tmp_path: Path) -> None:
    shutil.copytree(ONE_LOOKUP_FILE, tmp_path / "store")
    s = Store(str(tmp_path / "store"))
    table = pa.concat_tables([rows(40, "rock", "run-a"), rows(60, "jazz", "run-a").slice(40)])
    pointer = published(s)
    info, stored = pointer.similar, pointer.document["similar"]["lookup"]
    assert info.layout == 2 and isinstance(stored["vid"], str) and info.lookup == {c: [f] for c, f in stored.items()} and info.buckets == 3
    assert_exact(old_store_answers(s), table)
    # the next night adds t60 and t61: an update that keeps the one partition, its lists those of a rebuild
    second = pa.concat_tables([rows(40, "rock", "run-b"), rows(62, "jazz", "run-b").slice(40)])
    night = catalog.publish(s, second, "run-b", "m-1", SPACE).similar
    assert (night.mode, night.added, night.bounds) == ("incremental", 2, info.bounds)
    assert [len(files) for files in night.lookup.values()] == [1, 1]
    rebuilt = Store(str(tmp_path / "rebuilt"))
    catalog.publish(rebuilt, second, "run-b", "m-1", SPACE)
    same_lists(lists(s), lists(rebuilt))
    exact = exact_lists(second, 61)
    assert old_store_answers(s) == old_store_answers(rebuilt)
    assert_exact(old_store_answers(s), second)
    added = similar.answer(s, [("/music/61.mp3", "/music/61.mp3")], 5, None)[0]
    assert (added.source, added.track_id, [n["track_id"] for n in added.neighbours]) == ("table", "t61", exact["t61"][:5])


def test_space_fit_is_deterministic_and_normalises() -> None:
    from genre_batch.storage.feature_store import LIBROSA

    pooled = np.random.default_rng(1).normal(size=(300, 603)) * np.linspace(0.01, 1000, 603)
    a, b = vectors.fit(LIBROSA, pooled), vectors.fit(LIBROSA, pooled.copy())
    assert a.name == b.name and a.name.startswith("librosa-v") and a.components.shape == (603, catalog.VECTOR_DIM)
    y = vectors.project(a, pooled[:10].astype(np.float32))
    assert y.dtype == np.float32 and np.allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    small = vectors.fit(LIBROSA, pooled[:5])  # fewer tracks than dimensions: zero axes past the rank
    assert np.count_nonzero(np.abs(small.components).sum(axis=0)) == 4


# ---------------------------------------------------------------------------------------------------------------
# The tag stage on a real 2-process Dask cluster
# ---------------------------------------------------------------------------------------------------------------

STYLES = ("ambient", "chiptune", "electronic", "percussion")


def near_duplicate(source_style: str, seed: int, path: Path) -> Path:
    """A clip of `source_style` rendered from `seed` (as make_library does), 2 dB quieter with faint noise."""
    y = render(source_style, 3.0, seed) * 0.8 + np.random.default_rng(seed).normal(0, 1e-3, int(3.0 * SAMPLE_RATE)).astype(np.float32)
    return write_audio(path, y, SAMPLE_RATE, {"genre": source_style})


def run_tag(store: Path, scheduler: str, run_id: str, full: bool = False) -> tag_stage.TagSummary:
    """The tag stage."""
    with session(scheduler) as cluster:
        return tag_stage.tag(Store(str(store)), run_id, cluster, full=full)


@pytest.fixture(scope="module")
def tagged_once(tmp_path_factory: pytest.TempPathFactory, dask_scheduler: str) -> tuple[Path, Path]:
    """A library of 3 clips per style plus a near-duplicate of chiptune-0-01, extracted, trained and tagged once per
    module; a pristine copy of both sits next to them."""
    root = tmp_path_factory.mktemp("similar")
    library, store = root / "library", root / "store"
    make_library(library, 3, styles=STYLES)
    near_duplicate("chiptune", 100 + 1, library / "chiptune" / "copy-of-01.wav")  # make_library's seed of chiptune-0-01
    with session(dask_scheduler) as cluster:
        extract_stage.extract(str(library), Store(str(store)), runs.new_run_id(), cluster, features=("librosa",))
        assert train_stage.train(Store(str(store)), "folders", "run-train", cluster).promoted
    run_tag(store, dask_scheduler, "run-tag-1")
    return keep_pristine((library, store))


@pytest.fixture
def tagged(tagged_once: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    """The tagged library and store, restored afterwards."""
    yield from restored(tagged_once)


def uri_ids(s: Store) -> dict[str, str]:
    """File name -> track_id of the published catalog."""
    return {Path(r["uri"]).name: r["track_id"] for r in catalog.read(s, ["uri", "track_id"]).to_pylist()}


def test_catalog_carries_embeddings_tags_and_its_vector_space(tagged: tuple[Path, Path]) -> None:
    _, store = tagged
    s = Store(str(store))
    table = catalog.read(s)
    assert table.num_rows == 13 and table.schema.field("embedding").type == pa.list_(pa.float32(), catalog.VECTOR_DIM)
    x = similar.as_matrix(table["embedding"])
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert table["tags"].null_count == 13  # no musicnn family in this store: no tags
    pointer = published(s)
    space = pointer.vector_space
    assert pointer.catalog_version == 3 and space.family == "librosa" and space.dim == catalog.VECTOR_DIM
    assert space.name.startswith("librosa-v3-zpca128-") and "mean" in space.pooling and "z-score" in space.scaler
    assert space.file == vectors.space_file(space.name) and space.sample_tracks == 13 and space.family_version == vectors.LIBROSA.version
    assert vectors.load(s, space).name == space.name  # the stored arrays are the space (np.load without pickle)
    assert table.schema.metadata[b"genre_batch.catalog_version"] == b"3"


def test_near_duplicate_is_the_nearest_neighbour_and_query_sees_the_table(tagged: tuple[Path, Path]) -> None:
    _, store = tagged
    s = Store(str(store))
    ids = uri_ids(s)
    got = lists(s)
    assert got[ids["copy-of-01.wav"]][0][0] == ids["chiptune-0-01.flac"]
    assert got[ids["chiptune-0-01.flac"]][0][0] == ids["copy-of-01.wav"]
    assert all(len(v) == 12 for v in got.values())  # every other track: 13 tracks < K
    sql = ('SELECT c.uri, n.uri AS neighbour, s.score FROM "similar" s JOIN catalog c USING (track_id) '
           "JOIN catalog n ON n.track_id = s.neighbour_id WHERE s.rank = 1 AND c.uri LIKE '%copy-of-01.wav'")
    [row] = query.run(s, sql).to_pylist()
    assert row["neighbour"].endswith("chiptune-0-01.flac") and row["score"] > 0.9


def test_lists_are_stable_from_run_to_run(tagged: tuple[Path, Path], dask_scheduler: str) -> None:
    _, store = tagged
    s = Store(str(store))
    before = lists(s)
    assert run_tag(store, dask_scheduler, "run-tag-full", full=True).mode == "full"
    same_lists(lists(s), before)


def test_nightly_with_a_new_track_updates_lists_like_a_rebuild(tagged: tuple[Path, Path], dask_scheduler: str) -> None:
    library, store = tagged
    s = Store(str(store))
    near_duplicate("ambient", 0 * 100 + 2, library / "ambient" / "copy-of-ambient-02.wav")  # ambient-0-02's seed
    with session(dask_scheduler) as cluster:
        extract_stage.extract(str(library), s, runs.new_run_id(), cluster, features=("librosa",))
    summary = run_tag(store, dask_scheduler, "run-tag-2")
    pointer = published(s)
    assert (summary.mode, summary.predicted) == ("incremental", 1)
    assert (pointer.similar.mode, pointer.similar.added, pointer.similar.removed) == ("incremental", 1, 0)
    ids = uri_ids(s)
    got = lists(s)
    assert got[ids["ambient-0-02.ogg"]][0][0] == ids["copy-of-ambient-02.wav"]  # the new track entered an existing list
    rebuilt = SimilarRecord.parse(similar.build(s, "rebuild-check", sorted(pointer.files), None, similar.in_process))
    same_lists(got, lists(s, rebuilt))


def strip_to_version_2(s: Store) -> None:
    """Make the published snapshot look written by catalog version 2: no embedding, tags, vector space or similar."""
    pointer = published(s)
    for f in pointer.files:
        table = s.read_table(f"{s.catalog}/{f}").drop_columns(["embedding", "tags"])
        s.write_table(f"{s.catalog}/{f}", table.replace_schema_metadata({"genre_batch.catalog_version": "2"}))
    s.fs.rm(f"{s.catalog}/{pointer.similar.folder}", recursive=True)
    old = {k: v for k, v in pointer.document.items() if k not in ("vector_space", "similar")}
    catalog.promote(s, {**old, "catalog_version": 2}, s.version_token(f"{s.catalog}/{catalog.POINTER}"))


def test_a_version_2_store_keeps_working_and_the_first_run_fills_the_new_columns(tagged: tuple[Path, Path], dask_scheduler: str) -> None:
    _, store = tagged
    s = Store(str(store))
    strip_to_version_2(s)
    assert query.run(s, "SELECT count(*) AS n FROM catalog").to_pylist() == [{"n": 13}]
    assert query.run(s, "SELECT count(*) AS n FROM \"similar\"").to_pylist() == [{"n": 0}]
    with pytest.raises(GenreBatchError, match=r'syntax error at or near "similar" \(SIMILAR is a reserved word in DuckDB: name the table as "similar", in double quotes\)'):
        query.run(s, "SELECT count(*) FROM similar")
    with pytest.raises(GenreBatchError, match=r"Referenced column \"nope\" not found[^(]*$"):  # other errors: no hint
        query.run(s, "SELECT nope FROM \"similar\"")
    summary = run_tag(store, dask_scheduler, "run-tag-v3")
    assert (summary.mode, summary.predicted, summary.carried) == ("full", 13, 0)  # v2 rows lack the columns: re-tagged
    table = catalog.read(s)
    assert table["embedding"].null_count == 0 and published(s).catalog_version == 3
    assert query.run(s, "SELECT count(*) AS n FROM \"similar\"").to_pylist() == [{"n": 13 * 12}]


def test_similar_verb_answers_for_catalog_tracks_and_outside_files(tagged: tuple[Path, Path], tmp_path: Path) -> None:
    import json

    library, store = tagged
    ids = uri_ids(Store(str(store)))
    copy = str(library / "chiptune" / "copy-of-01.wav")
    code, out, err = cli("similar", "--store", str(store), copy, ids["ambient-0-00.wav"], "--top", "3", "--format", "json")
    assert code == 0, err
    first, second = json.loads(out)
    assert (first["source"], first["track_id"], first["genre"]) == ("table", ids["copy-of-01.wav"], "chiptune")
    assert [n["rank"] for n in first["neighbours"]] == [1, 2, 3] and first["neighbours"][0]["uri"].endswith("chiptune-0-01.flac")
    assert second["uri"].endswith("ambient-0-00.wav") and len(second["neighbours"]) == 3

    code, out, err = cli("similar", "--store", str(store), copy, "--top", "3", "--genre", "percussion", "--format", "json")
    [only] = json.loads(out)
    assert code == 0 and only["source"] == "index" and [n["genre"] for n in only["neighbours"]] == ["percussion"] * 3
    code, out, _ = cli("similar", "--store", str(store), copy, "--top", "3", "--genre", " Percussion ", "--format", "json")
    assert code == 0 and json.loads(out) == [only]  # genres are compared as labels are stored: trimmed, lower-case
    code, out, _ = cli("similar", "--store", str(store), copy, "--top", "12", "--format", "json")
    deep = json.loads(out)[0]["neighbours"]  # all 12 others, past nothing: the table holds them all
    assert len(deep) == 12 and deep[:3] == first["neighbours"]

    outside = near_duplicate("chiptune", 101, tmp_path / "elsewhere.wav")  # copy-of-01.wav's audio, not in the catalog
    before = sorted(p for p in store.rglob("*"))
    code, out, err = cli("similar", "--store", str(store), str(outside), "--top", "2")
    assert code == 0, err
    header, first_line, second_line = out.splitlines()
    assert header == f"{outside} (not in the catalog, from the file):"
    assert "1.000" in first_line and first_line.endswith("copy-of-01.wav  (chiptune)") and "chiptune-0-01.flac" in second_line
    assert sorted(p for p in store.rglob("*")) == before  # nothing stored

    code, out, err = cli("similar", "--store", str(store), "no-such-track")
    assert (code, out) == (1, "") and err.startswith("error: no-such-track: not a track_id or uri of the published catalog, nor a readable audio file: "
                                                     "cannot read file: No such file or directory")
    code, out, err = cli("similar", "--store", str(store), "no-such-track", copy, "--top", "3", "--format", "json")
    missing, found = json.loads(out)  # the other track is still answered, in the order named
    assert code == 1 and found == first and missing == {"track": "no-such-track", "error": err.splitlines()[0].removeprefix("error: ")}
    assert err.count("\n") == 1 and err.startswith("error: no-such-track: not a track_id or uri")
    code, _, err = cli("similar", "--store", str(store), copy, "--genre", "polka")
    assert code == 1 and err.startswith("error: --genre polka: no such genre in the published catalog; it has ambient, chiptune")


def test_musicnn_family_for_every_track_is_a_new_space_with_tags(tmp_path: Path, dask_scheduler: str) -> None:
    from genre_batch.analysis.columns import TAG_NAMES
    from genre_batch.storage.feature_store import TAG_COLUMNS, by_part, current_tracks, read_windows

    library, store = tmp_path / "library", tmp_path / "store"
    make_library(library, 3, styles=STYLES)
    s = Store(str(store))
    with session(dask_scheduler) as cluster:
        extract_stage.extract(str(library), s, runs.new_run_id(), cluster, features=("librosa",))
        assert train_stage.train(s, "folders", "run-train", cluster).promoted
    run_tag(store, dask_scheduler, "run-librosa")
    assert published(s).vector_space.family == "librosa" and catalog.read(s)["tags"].null_count == 12
    with session(dask_scheduler) as cluster:  # backfill the musicnn family: now every track has it
        extract_stage.extract(str(library), s, runs.new_run_id(), cluster, features=("librosa", "musicnn"))
    summary = run_tag(store, dask_scheduler, "run-musicnn")
    pointer = published(s)
    assert (summary.mode, summary.predicted) == ("full", 12)  # a new vector space re-tags every track ...
    assert pointer.vector_space.family == "musicnn" and pointer.vector_space.name.startswith("musicnn-v1-zpca128-")
    assert pointer.similar.mode == "full"  # ... and rebuilds the index
    table = catalog.read(s, ["uri", "tags", "embedding"])
    rows = pa.concat_tables([read_windows(s, g, ["uri", *TAG_COLUMNS], vectors.MUSICNN) for g in by_part(current_tracks(s, family=vectors.MUSICNN))])
    expected = {r["uri"]: [TAG_NAMES[i].lower() for i in np.argsort([-r[c] for c in TAG_COLUMNS], kind="stable")[:5]] for r in rows.to_pylist()}
    assert {r["uri"]: r["tags"] for r in table.to_pylist()} == expected
    assert np.allclose(np.linalg.norm(similar.as_matrix(table["embedding"]), axis=1), 1, atol=1e-5)
