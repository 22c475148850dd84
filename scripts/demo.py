"""`make demo`: the main job on the embedded default.

Starts the bundled Hub emulator on 127.0.0.1 with the sample repos, pulls examples/demo.yaml into
demo-work/, pulls it again (warm: no request), stops the server, then loads everything in a fresh process
with the network off through the real huggingface_hub and datasets clients, and prints what it loaded.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hpcstage.samples import make_samples
from hpcstage.serve import HubServer

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "demo-work"

OFFLINE_LOAD = r'''
import json, struct
from huggingface_hub import hf_hub_download, snapshot_download
from datasets import load_dataset

model = snapshot_download("demo-org/tiny-model", local_files_only=True)
print(f"model main      -> {model}")
with open(f"{model}/model.safetensors", "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
tensors = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
print(f"  safetensors: {len(tensors)} tensors, e.g. " + ", ".join(f"{k} {v}" for k, v in list(tensors.items())[:2]))
vocab = json.load(open(f"{model}/tokenizer.json"))["model"]["vocab"]
print(f"  tokenizer.json: {len(vocab)} tokens")
cfg = json.load(open(hf_hub_download("demo-org/tiny-model", "config.json", revision="v1.0", local_files_only=True)))
print(f"model v1.0      -> config.json model_type={cfg.get('model_type')} max_position_embeddings={cfg.get('max_position_embeddings')}")
snapshot_download("demo-org/tiny-model", revision="v1.0", allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
data = snapshot_download("demo-org/tiny-dataset", repo_type="dataset", local_files_only=True)
ds = load_dataset(data)
print(f"dataset         -> {data}")
print("  " + ", ".join(f"{split}: {len(ds[split])} rows" for split in ds) + f"; columns {ds['train'].column_names}")
print(f"  first row: {ds['train'][0]}")
'''


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    make_samples(WORK / "hub-root")
    manifest = WORK / "hpcstage.yaml"
    shutil.copy(REPO / "examples" / "demo.yaml", manifest)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    base.update(HF_HOME=str(WORK / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_UPDATE_DOWNLOAD_COUNTS="0")
    hpcstage = [sys.executable, "-m", "hpcstage"]
    with HubServer(WORK / "hub-root") as server:
        print(f"== Hub emulator on {server.url} serving {WORK / 'hub-root'}")
        env = dict(base, HF_ENDPOINT=server.url)
        print(f"== hpcstage pull -f {manifest.relative_to(REPO)}", flush=True)
        subprocess.run([*hpcstage, "pull", "-f", str(manifest)], env=env, check=True)
        server.clear_log()
        print("== again, warm (from hpcstage.lock)", flush=True)
        subprocess.run([*hpcstage, "pull", "-f", str(manifest)], env=env, check=True)
        print(f"   requests sent by the warm pull: {len(server.log)}")
    print("== server stopped; loading offline in a fresh process (HF_HUB_OFFLINE=1)", flush=True)
    offline = dict(base, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(WORK / "hub-cache"),
                   HF_DATASETS_CACHE=str(WORK / "datasets-cache"), HF_ENDPOINT="http://127.0.0.1:9",
                   HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    subprocess.run([sys.executable, "-c", OFFLINE_LOAD], env=offline, check=True)
    print("== demo ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
