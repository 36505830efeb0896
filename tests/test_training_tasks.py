"""What train does outside its workers runs in Ray tasks, not in the driver (capray.tasks.run_in_task):
the feature statistics before fitting and the run's plots after it."""
from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capray import storage
from capray.formats import FEATURES, feature_schema
from capray.tasks import run_in_task
from capray.training import write_run_plots
from capray.training_data import feature_statistics

pytestmark = pytest.mark.slow


def test_run_in_task_runs_elsewhere_and_raises_the_task_s_own_error(ray_local, tmp_path):
    assert run_in_task(os.getpid, what="probe") != os.getpid()
    with pytest.raises(storage.StorageError) as raised:  # the exception itself, not Ray's wrapper around it
        run_in_task(storage.read_json, str(tmp_path / "missing.json"), what="probe")
    assert "missing.json" in str(raised.value) and "Traceback" not in str(raised.value)
    with pytest.raises(TimeoutError, match="slow probe"):
        run_in_task(time.sleep, 30, what="slow probe", timeout_s=1)


def test_feature_statistics_of_the_first_images(ray_local, tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, (40, 4, 6)).astype(np.float16)  # (N, P, E)
    table = pa.table({"image_id": [str(i) for i in range(40)], "image": ["x"] * 40,
                      FEATURES: pa.FixedShapeTensorArray.from_numpy_ndarray(features),
                      "captions": [["a"]] * 40, "tokens": [[[1]]] * 40}, schema=feature_schema(4, 6))
    pq.write_table(table, tmp_path / "part-0.parquet")
    mean, std = feature_statistics(str(tmp_path), max_images=30)
    first = features[:30].astype(np.float64).reshape(-1, 6)
    np.testing.assert_allclose(mean, first.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, first.std(0), rtol=1e-4)


def test_run_plots_that_cannot_be_drawn_are_a_warning(ray_local, tmp_path, caplog):
    write_run_plots(str(tmp_path / "no-run"), features=str(tmp_path / "no-features"), images=1)
    assert "could not plot the run" in caplog.text
