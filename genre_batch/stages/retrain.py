"""The labelled set of a store and the nightly retrain policy: whether a run trains, decided from the track index and
the registry alone (no model library is imported: `run --dry-run` and a no-op nightly stay cheap)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc

from genre_batch import GenreBatchError
from genre_batch.library import labels
from genre_batch.library.writeback import retagged, written
from genre_batch.modelling import registry, training
from genre_batch.stages.extract import library_of
from genre_batch.storage.feature_store import KEYS, current_tracks, read_inventory
from genre_batch.storage.store import Store

RETRAIN_CHANGED_SHARE = 0.05
RETRAIN_AFTER_DAYS = 30
"""`--retrain auto` (nightly default) retrains when there is no current model, or the current model is not pinned and
either more than RETRAIN_CHANGED_SHARE of the labelled set changed (tracks added, removed, re-labelled or changed
content), or it is older than RETRAIN_AFTER_DAYS and anything in the labelled set changed."""


@dataclass(frozen=True)
class Labelled:
    """The store's labelled tracks for a label spec: index rows with a `genre`, and what training keeps of them."""

    tracks: pa.Table
    genres: list[str]
    dropped: dict[str, int]
    fingerprint: str
    source: str


def labelled(store: Store, spec: str, grouping: str = "auto") -> Labelled:
    """The labelled tracks of the store's current index for a label spec (no window rows are read; only the index
    columns training needs: `training.index_columns`)."""
    tracks = current_tracks(store, read_inventory(store, KEYS), columns=training.index_columns(grouping))
    source = labels.label_source(spec)
    kept, genres, dropped, fingerprint = training.labelled_tracks(tracks, labels.resolve(spec, tracks, library_of(store), written(store)), source)
    return Labelled(kept, genres, dropped, fingerprint, source)


def labelled_keys(data: Labelled) -> pa.Table:
    """(uri, fingerprint, genre) of a labelled set: what the registry keeps with a model."""
    return data.tracks.select([*KEYS, "genre"])


def tag_write_contents(rewrites: pa.Table) -> pa.Table:
    """(uri, fingerprint, content) of every fingerprint genre-batch's tag writes gave or took from a file
    (`rewrites`: writeback.retagged): fingerprints linked by writes and undos are one audio content, named by the
    smallest of them (a union-find over the writes; a restore may give a file its old fingerprint back)."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(node: tuple[str, str]) -> tuple[str, str]:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for uri, new, old in zip(*(rewrites[c].to_pylist() for c in ("uri", "new_fingerprint", "old_fingerprint"))):
        if new is not None and old is not None:
            a, b = root((uri, new)), root((uri, old))
            parent[max(a, b)] = min(a, b)
    nodes = list(parent)
    return pa.table({"uri": pa.array([u for u, _ in nodes], pa.string()), "fingerprint": pa.array([f for _, f in nodes], pa.string()),
                     "content": pa.array([root(n)[1] for n in nodes], pa.string())})


def untagged(keys: pa.Table, rewrites: pa.Table) -> pa.Table:
    """Labelled keys with each fingerprint that genre-batch's tag writes reach replaced by its content's name
    (`tag_write_contents`): a tag written back, or undone, changes neither the audio nor the label."""
    if rewrites.num_rows == 0:
        return keys
    traced = keys.join(tag_write_contents(rewrites), keys=["uri", "fingerprint"], join_type="left outer")
    return traced.set_column(traced.schema.get_field_index("fingerprint"), "fingerprint",
                             pc.coalesce(traced["content"], traced["fingerprint"])).drop_columns(["content"])


def changed_share(before: pa.Table, now: pa.Table) -> float:
    """Share of a labelled set that changed: tracks (URIs) with a row in one set and not the same in the other (added,
    removed, re-labelled or new content, each counted once), over the size of the old set."""
    keys = [*KEYS, "genre"]
    gone = before.join(now.select(keys), keys=keys, join_type="left anti")["uri"]
    new = now.join(before.select(keys), keys=keys, join_type="left anti")["uri"]
    changed = pc.count_distinct(pa.chunked_array([*gone.chunks, *new.chunks], pa.string())).as_py()
    return changed / max(1, before.num_rows)


def retrain_decision(store: Store, spec: str, policy: str = "auto", now: datetime | None = None) -> tuple[bool, str]:
    """Whether a nightly run retrains, and why (see RETRAIN_CHANGED_SHARE)."""
    version = registry.current_version(store)
    if policy == "always":
        return True, "--retrain always"
    if version is None:
        if policy == "never":
            raise GenreBatchError(f"no current model in {store.url} and --retrain never: train one with 'genre-batch train'")
        return True, "no current model"
    if policy == "never":
        return False, f"--retrain never: current model {version} kept"
    if registry.pinned(store):
        return False, f"current model {version} is pinned"
    card = registry.card(store, version)
    data = labelled(store, spec)
    if card.label_source != data.source:
        return True, f"label source changed ({card.label_source} -> {data.source})"
    before = registry.labelled_set(store, version)
    if before is None:  # a model registered before labelled sets were kept: only an identical set counts as unchanged
        same = card.training_fingerprint == data.fingerprint
        return (False, f"current model {version} was trained on the same labelled data") if same else (True, "labels or features changed since the current model was trained")
    rewrites = retagged(store)
    share = changed_share(untagged(before, rewrites), untagged(labelled_keys(data), rewrites))
    age = (now or datetime.now(timezone.utc)) - card.created_at
    if share > RETRAIN_CHANGED_SHARE:
        return True, f"{share:.1%} of the labelled set changed (retrain above {RETRAIN_CHANGED_SHARE:.0%})"
    if share > 0 and age > timedelta(days=RETRAIN_AFTER_DAYS):
        return True, f"the labelled set changed ({share:.1%}) and current model {version} is older than {RETRAIN_AFTER_DAYS} days"
    if share == 0:
        return False, f"current model {version} was trained on the same labelled data"
    return False, f"only {share:.1%} of the labelled set changed (retrain above {RETRAIN_CHANGED_SHARE:.0%}): current model {version} kept"
