"""The model interface (#14 item 3): every kind fits, predicts, round-trips through the registry without pickle;
cards written before kinds load as XGBoost."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import xgboost as xgb
from sklearn.linear_model import LogisticRegression

from genre_batch import GenreBatchError, checks
from genre_batch.analysis.columns import FEATURE_NAMES, FEATURE_VERSION
from genre_batch.modelling import registry
from genre_batch.modelling.model import KINDS, MAX_ROUNDS, PARAMS, PREDICT_CHUNK, LinearModel, XGBoostModel, model_class, validation_split
from genre_batch.storage.store import Store

from conftest import FIRST_CARD

COLUMNS = [f"c{i}" for i in range(6)]


def blobs(n: int = 120, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `classes` separable clusters on wildly different column scales, their labels and 30 groups."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.normal(size=(n, len(COLUMNS)))
    X[:, 0] += 3.0 * y
    X *= np.array([1.0, 1e3, 1e-3, 10.0, 1.0, 100.0])  # standardisation must undo this
    return X.astype(np.float32), y.astype(np.int32), np.arange(n) % 30


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_learns_and_round_trips_through_the_registry(kind: str, tmp_path: Path) -> None:
    X, y, groups = blobs()
    model = model_class(kind).fit(X[:90], y[:90], np.ones(90), groups[:90], 3, COLUMNS)
    p = model.predict_proba(X[90:])
    assert p.shape == (30, 3) and np.allclose(p.sum(axis=1), 1.0, atol=1e-5)
    assert (p.argmax(axis=1) == y[90:]).mean() >= 0.9

    store = Store(str(tmp_path))
    labelled = pa.table({k: pa.array([], pa.string()) for k in ("uri", "fingerprint", "genre")})
    registry.register(store, "m-1", model, {**FIRST_CARD, "feature_version": FEATURE_VERSION}, b"", labelled)
    loaded, card = registry.load(store, "m-1")
    assert card.classifier == kind and card.version == "m-1" and type(loaded) is type(model)
    assert np.allclose(loaded.predict_proba(X[90:]), p, atol=1e-6)
    assert loaded.params() == model.params()
    assert sorted(p.name for p in (tmp_path / "models" / "m-1").iterdir()) == sorted([*model.files, "confusion_matrix.png", "labelled.parquet", "metadata.json"])


def test_linear_model_is_plain_arrays_loaded_without_pickle(tmp_path: Path) -> None:
    X, y, groups = blobs()
    model = LinearModel.fit(X, y, np.ones(len(y)), groups, 3, COLUMNS)
    data = model.to_files()["model.npz"]
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        assert sorted(arrays.files) == ["C", "coef", "intercept", "mean", "scale"]
        assert arrays["coef"].shape == (3, len(COLUMNS)) and arrays["coef"].dtype == np.float64
        assert all(arrays[k].dtype != object for k in arrays.files)
    assert model.C in (0.001, 0.01, 0.1, 1.0)
    # the saved arrays are the whole model: softmax of standardised rows reproduces its probabilities
    z = (X.astype(np.float64) - model.mean) / model.scale @ model.coef.T + model.intercept
    expected = np.exp(z - z.max(axis=1, keepdims=True))
    assert np.allclose(model.predict_proba(X), expected / expected.sum(axis=1, keepdims=True), atol=1e-4)


def test_linear_model_matches_scikit_learn_for_two_genres_and_a_genre_absent_from_training() -> None:
    X, y, _ = blobs(classes=2)
    model = LinearModel.fit_C(X, y, np.ones(len(y)), 2, 0.1)
    Z = (X - model.mean) / model.scale
    reference = LogisticRegression(C=0.1, max_iter=2000).fit(Z, y).predict_proba(Z)
    assert np.allclose(model.predict_proba(X), reference, atol=1e-4)

    three = LinearModel.fit_C(X, y, np.ones(len(y)), 3, 0.1)  # genre 2 has no training rows (a fold can lack one)
    p = three.predict_proba(X)
    assert p.shape == (len(y), 3) and p[:, 2].max() < 1e-9 and np.allclose(p[:, :2], reference, atol=1e-4)


def test_a_card_of_the_first_version_loads_as_xgboost_on_librosa_uncalibrated(tmp_path: Path) -> None:
    """Stores written before model kinds: model.ubj and a card as the first genre-batch wrote it."""
    X, y, groups = blobs()
    booster = XGBoostModel.fit(np.pad(X, ((0, 0), (0, len(FEATURE_NAMES) - X.shape[1]))), y, np.ones(len(y)), groups, 3, list(FEATURE_NAMES)).booster
    store = Store(str(tmp_path))
    store.write_bytes(f"{store.models}/m-old/model.ubj", bytes(booster.save_raw("ubj")))
    store.write_json(f"{store.models}/m-old/metadata.json", {**FIRST_CARD, "version": "m-old", "feature_version": FEATURE_VERSION})
    model, card = registry.load(store, "m-old")
    assert isinstance(model, XGBoostModel) and card.classifier == "xgboost" and card.families == {"librosa": FEATURE_VERSION}
    assert (card.temperature, card.abstain_below, card.labelled_tracks, card.genres) == (1.0, 0.0, 30, ("a", "b", "c"))
    assert card.created_at.isoformat() == FIRST_CARD["created_at"] and card.gate_passed and card.holdout_accuracy == 0.8
    assert model.predict_proba(np.zeros((2, len(FEATURE_NAMES)), np.float32)).shape == (2, 3)
    assert registry.summary(card, registry.ModelPointer("m-old"))["classifier"] == "xgboost"


def test_a_card_lacking_a_field_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    store.write_json(f"{store.models}/m-1/metadata.json", {k: v for k, v in FIRST_CARD.items() if k != "holdout"})
    with pytest.raises(GenreBatchError, match=f"^damaged JSON file in the store: {tmp_path}/models/m-1/metadata.json \\(no field 'holdout'\\)$"):
        registry.card(store, "m-1")
    store.write_json(f"{store.models}/{registry.POINTER}", {"pinned": True})
    with pytest.raises(GenreBatchError, match="models/CURRENT.json \\(no field 'version'\\)$"):
        registry.pointer(store)


def test_a_promotion_by_hand_keeps_the_pin_and_a_trained_promotion_sets_it(tmp_path: Path) -> None:
    """`models promote` keeps the pin of the pointer it replaces (read in the same conditional switch); train's promote
    sets the pin it is given."""
    store = Store(str(tmp_path))
    for version in ("m-1", "m-2", "m-3"):
        store.write_json(f"{store.models}/{version}/metadata.json", {**FIRST_CARD, "version": version})
    registry.promote(store, "m-1", pinned=True)
    assert (registry.promote_checked(store, "m-2").pinned, registry.pointer(store).history) == (True, ("m-1",))
    assert registry.promote(store, "m-3").pinned is False and not registry.pinned(store)
    assert registry.promote_checked(store, "m-2").pinned is False


def test_unknown_kind_is_a_clear_error_and_the_cli_lists_every_kind() -> None:
    assert checks.CLASSIFIERS == tuple(KINDS)  # checked before any training library loads, so listed twice
    with pytest.raises(Exception, match="unknown classifier 'svm': this genre-batch knows xgboost, linear"):
        model_class("svm")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_rows_probabilities_do_not_depend_on_its_batch(kind: str) -> None:
    """#12: an incremental re-tag equals a full one only if a row predicted alone, with a few others, or in a batch of
    thousands in another order (past one PREDICT_CHUNK) gets exactly the same probabilities."""
    rng = np.random.default_rng(1)
    columns = [f"c{i}" for i in range(64)]
    y = np.arange(400) % 4
    scales = rng.uniform(1e-3, 1e3, len(columns))
    X = ((rng.normal(size=(400, len(columns))) + 0.5 * y[:, None] * (np.arange(len(columns)) % 4 == 0)) * scales).astype(np.float32)
    model = model_class(kind).fit(X, y.astype(np.int32), np.ones(len(y)), np.zeros(len(y)), 4, columns)  # one group: no validation fold, default settings
    batch = (rng.normal(size=(PREDICT_CHUNK + 1500, len(columns))) * scales).astype(np.float32)
    full = model.predict_proba(batch)
    chosen = np.array([0, 7, 4095, PREDICT_CHUNK - 1, PREDICT_CHUNK, len(batch) - 1])
    assert all((model.predict_proba(batch[i : i + 1])[0] == full[i]).all() for i in chosen)  # alone
    assert (model.predict_proba(batch[chosen[::-1]]) == full[chosen[::-1]]).all()  # a few, reversed
    order = rng.permutation(len(batch))
    assert (model.predict_proba(batch[order]) == full[order]).all()  # the whole batch shuffled
    assert (model.predict_proba(np.asfortranarray(batch[:300])) == full[:300]).all()  # column-major rows
    assert (model.predict_rows(batch, order[:5000]) == full[order[:5000]]).all()  # some rows of a larger matrix


def test_without_the_refit_a_fit_is_the_model_its_validation_fold_chose() -> None:
    """#12: a cross-validation fold keeps the model its validation fold chose, fitted on the rows outside that fold:
    XGBoost's early-stopped booster cut to its best iteration (what boosting those rows for the chosen rounds gives),
    the linear model of the chosen C. The refitted model has the same setting, fitted on all the rows."""
    X, y, groups = blobs(n=300)
    weight = np.ones(len(y))
    outside = validation_split(y, groups)[0]
    once, refitted = (XGBoostModel.fit(X, y, weight, groups, 3, COLUMNS, refit=r) for r in (False, True))
    assert once.rounds == refitted.rounds == XGBoostModel.rounds_for(X, y, weight, groups, 3, COLUMNS) == once.booster.num_boosted_rounds()
    assert once.rounds < MAX_ROUNDS  # it stopped early: the booster trained past its best iteration and was cut
    alone = xgb.train({**PARAMS, "num_class": 3}, XGBoostModel.quantised(X, outside, y, weight, COLUMNS), num_boost_round=once.rounds)
    assert np.array_equal(once.predict_proba(X), alone.inplace_predict(X))
    assert not np.array_equal(once.predict_proba(X), refitted.predict_proba(X))
    linear_once, linear_refitted = (LinearModel.fit(X, y, weight, groups, 3, COLUMNS, refit=r) for r in (False, True))
    assert linear_once.C == linear_refitted.C
    assert np.array_equal(linear_once.coef, LinearModel.fit_C(X, y, weight, 3, linear_once.C, outside).coef)
    assert not np.allclose(linear_once.coef, linear_refitted.coef)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_without_a_validation_fold_the_refit_changes_nothing(kind: str) -> None:
    """Too few groups to validate on: one fit on all the rows with the default setting, refit or not."""
    X, y, _ = blobs()
    fits = [model_class(kind).fit(X, y, np.ones(len(y)), np.zeros(len(y)), 3, COLUMNS, refit=r) for r in (False, True)]
    assert fits[0].to_files() == fits[1].to_files() and fits[0].params() == fits[1].params()
