"""Deterministic sample repos for tests, demos and benchmarks served by `hpcstage serve`.

Bytes are derived from fixed seeds only (no timestamps), so file hashes and the server's commit shas are
the same on every machine, and rewriting an identical file is skipped so mtimes (and caches keyed on them)
stay put.
"""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MODEL_ID = "demo-org/tiny-model"
DATASET_ID = "demo-org/tiny-dataset"
EVAL_DATASET_ID = "demo-org/tiny-boolq"  # shaped like lm_eval's boolq (super_glue): examples/lm_eval/tiny_boolq.yaml
MODEL_TAG = "v1.0"

_SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
_WORDS = (
    "the a an of to in and is was for on with as by at from it this that be are model data train test "
    "small tiny fast cluster node job file cache stage offline hub token text label good bad yes no"
).split()
_VOCAB_SIZE = 256
_HIDDEN = 64
_INTERMEDIATE = 128
DATASET_SPLITS = {"train": 300, "test": 100}


def make_samples(root: Path) -> dict:
    """Write the sample repos under `root` (the layout `HubServer` serves) and return their ids."""
    root = Path(root)
    model = root / "models" / MODEL_ID
    for folder, seed, overrides in (
        (model, 1, {}),
        (model.with_name(f"{model.name}@{MODEL_TAG}"), 2, {"rms_norm_eps": 1e-5, "max_position_embeddings": 64}),
    ):
        for name, content in _model_files(seed, overrides).items():
            _write_if_changed(folder / name, content)
    dataset = root / "datasets" / DATASET_ID
    for name, content in _dataset_files().items():
        _write_if_changed(dataset / name, content)
    for name, content in _boolq_files().items():
        _write_if_changed(root / "datasets" / EVAL_DATASET_ID / name, content)
    return {
        "model": MODEL_ID,
        "dataset": DATASET_ID,
        "eval_dataset": EVAL_DATASET_ID,
        "model_revisions": ["main", MODEL_TAG],
    }


def _write_if_changed(path: Path, content: bytes) -> None:
    """Atomically replace `path` unless it already holds exactly `content`."""
    if path.is_file() and path.read_bytes() == content:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _vocab() -> dict[str, int]:
    tokens = _SPECIAL + _WORDS
    tokens += [f"tok{i}" for i in range(_VOCAB_SIZE - len(tokens))]
    return {t: i for i, t in enumerate(tokens)}


def _model_files(seed: int, overrides: dict) -> dict[str, bytes]:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": _VOCAB_SIZE,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        **overrides,
    }
    special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(_SPECIAL)
        ],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": _vocab(), "unk_token": "[UNK]"},
    }
    readme = (
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n"
        f"# tiny-model\n\nA one-layer Llama with random weights (seed {seed}) for testing hpcstage.\n"
    )
    return {
        "config.json": _json(config),
        "generation_config.json": _json({"bos_token_id": 2, "eos_token_id": 3, "max_new_tokens": 16}),
        "tokenizer.json": _json(tokenizer),
        "tokenizer_config.json": _json(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 128,
                "clean_up_tokenization_spaces": False,
                **special,
            }
        ),
        "special_tokens_map.json": _json(special),
        "README.md": readme.encode(),
        "model.safetensors": _safetensors(_llama_weights(seed)),
    }


def _llama_weights(seed: int) -> dict[str, tuple[list[int], list[float]]]:
    h, i, v = _HIDDEN, _INTERMEDIATE, _VOCAB_SIZE
    shapes = {
        "model.embed_tokens.weight": [v, h],
        "model.layers.0.self_attn.q_proj.weight": [h, h],
        "model.layers.0.self_attn.k_proj.weight": [h, h],
        "model.layers.0.self_attn.v_proj.weight": [h, h],
        "model.layers.0.self_attn.o_proj.weight": [h, h],
        "model.layers.0.mlp.gate_proj.weight": [i, h],
        "model.layers.0.mlp.up_proj.weight": [i, h],
        "model.layers.0.mlp.down_proj.weight": [h, i],
        "model.layers.0.input_layernorm.weight": [h],
        "model.layers.0.post_attention_layernorm.weight": [h],
        "model.norm.weight": [h],
        "lm_head.weight": [v, h],
    }
    rng = random.Random(seed)
    tensors = {}
    for name, shape in shapes.items():
        count = shape[0] * (shape[1] if len(shape) > 1 else 1)
        values = [1.0] * count if name.endswith("norm.weight") else [rng.gauss(0.0, 0.02) for _ in range(count)]
        tensors[name] = (shape, values)
    return tensors


def _safetensors(tensors: dict[str, tuple[list[int], list[float]]]) -> bytes:
    """Encode float32 tensors in the safetensors format: u64 header length, JSON header, raw data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        shape, values = tensors[name]
        data = struct.pack(f"<{len(values)}f", *values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


_DATASET_README = """---
license: cc0-1.0
task_categories:
- text-classification
language:
- en
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---

# tiny-dataset

Synthetic sentences with a binary label, for testing hpcstage. Splits: train (300 rows), test (100 rows).
"""


def _dataset_files() -> dict[str, bytes]:
    rng = random.Random(7)
    rows = [
        {"id": n, "text": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12))), "label": rng.randint(0, 1)}
        for n in range(sum(DATASET_SPLITS.values()))
    ]
    train, test = rows[: DATASET_SPLITS["train"]], rows[DATASET_SPLITS["train"] :]
    half = len(train) // 2
    return {
        "README.md": _DATASET_README.encode(),
        "data/train-00000-of-00002.parquet": _parquet(train[:half]),
        "data/train-00001-of-00002.parquet": _parquet(train[half:]),
        "data/test-00000-of-00001.parquet": _parquet(test),
    }


_BOOLQ_README = """---
license: cc0-1.0
task_categories:
- question-answering
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
---

# tiny-boolq

Yes/no questions about a passage, in the columns of super_glue's boolq (passage, question, idx, label:
0 no, 1 yes), for running a real lm_eval task definition offline. Splits: train (8 rows), validation (12 rows).
"""


def _boolq_files() -> dict[str, bytes]:
    rng = random.Random(11)
    rows = [
        {
            "passage": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))),
            "question": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 6))),
            "idx": n % 8 if n < 8 else n - 8,
            "label": rng.randint(0, 1),
        }
        for n in range(20)
    ]
    schema = pa.schema(
        [("passage", pa.string()), ("question", pa.string()), ("idx", pa.int32()), ("label", pa.int64())]
    )
    return {
        "README.md": _BOOLQ_README.encode(),
        "data/train-00000-of-00001.parquet": _parquet(rows[:8], schema),
        "data/validation-00000-of-00001.parquet": _parquet(rows[8:], schema),
    }


def _parquet(rows: list[dict], schema: pa.Schema | None = None) -> bytes:
    schema = schema or pa.schema([("id", pa.int64()), ("text", pa.string()), ("label", pa.int64())])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()
