"""Data contracts, defined once: Parquet schemas, file names of every output and of a checkpoint."""
from __future__ import annotations

import pyarrow as pa

# Feature dataset (written by prepare): FEATURES_DIR/{split}/part-*.parquet + vocab.json + prepare.json.
IMAGE_ID, IMAGE, FEATURES, CAPTIONS, TOKENS = "image_id", "image", "features", "captions", "tokens"
VOCAB_FILE = "vocab.json"
PREPARE_FILE = "prepare.json"
ENCODER_STATE_FILE = "encoder.pt"  # the encoder's weights: training copies them into every checkpoint

# Checkpoint directory: self-contained, enough to caption on a cluster with no internet.
MODEL_FILE = "model.pt"  # {"encoder.*": ..., "decoder.*": ...} tensors, loaded with weights_only=True
CONFIG_FILE = "config.json"  # encoder spec, decoder config, training config
TRAIN_STATE_FILE = "train_state.json"  # epoch, step, metrics
OPTIMIZER_FILE = "optimizer.pt"  # optimizer + scaler state, for resuming

# Caption output (written by caption): OUTPUT/part-*.parquet + summary.json.
PATH, CAPTION, SCORE, WIDTH, HEIGHT, ERROR = "path", "caption", "score", "width", "height", "error"
SUMMARY_FILE = "summary.json"
CAPTION_SCHEMA = pa.schema([
    pa.field(PATH, pa.string(), nullable=False),
    pa.field(CAPTION, pa.string()),
    pa.field(SCORE, pa.float32()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(ERROR, pa.string()),
])

# Evaluation output: OUT/metrics.json + OUT/results.json (COCO format).
METRICS_FILE = "metrics.json"
RESULTS_FILE = "results.json"


def feature_type(num_regions: int, num_features: int) -> pa.DataType:
    """Arrow's canonical fixed-shape tensor: float16 [P, E] per image."""
    return pa.fixed_shape_tensor(pa.float16(), [num_regions, num_features])


def feature_schema(num_regions: int, num_features: int) -> pa.Schema:
    return pa.schema([
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(IMAGE, pa.string(), nullable=False),
        pa.field(FEATURES, feature_type(num_regions, num_features), nullable=False),
        pa.field(CAPTIONS, pa.list_(pa.string())),
        pa.field(TOKENS, pa.list_(pa.list_(pa.int32()))),
    ])
