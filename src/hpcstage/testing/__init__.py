"""A Hugging Face Hub on 127.0.0.1 for tests, demos and benchmarks: yours and ours.

    from hpcstage.testing import HubServer, make_samples

    make_samples(root)                  # deterministic sample repos (demo-org/tiny-model, ...) under root
    with HubServer(root) as hub:        # the Hub protocol, real-Hub behaviours and fault injection
        env = {"HF_ENDPOINT": hub.url}  # point huggingface_hub, datasets and hpcstage at it

`hub` is the server (HubServer, FaultRule), `uploads` its write API (create_repo, upload_folder), `samples`
the sample repos. The `hpcstage serve` command runs the same server from the shell.
"""

from hpcstage.testing.hub import FaultRule, HubServer
from hpcstage.testing.samples import DATASET_ID, MODEL_ID, make_samples

__all__ = ["DATASET_ID", "MODEL_ID", "FaultRule", "HubServer", "make_samples"]
