from __future__ import annotations

import pytest

from hpcstage.samples import make_samples
from hpcstage.serve import HubServer


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """The sample repos (hpcstage.samples), written once per session: read-only, copy it to change a repo."""
    root = tmp_path_factory.mktemp("samples")
    make_samples(root)
    return root


@pytest.fixture
def hub(sample_root):
    """A started HubServer on the sample repos; stopped after the test."""
    with HubServer(sample_root) as server:
        yield server
