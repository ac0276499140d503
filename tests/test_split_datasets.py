"""The LFW faces hook of the partitioned-training experiments (nnmark.split.datasets)."""

from __future__ import annotations

import numpy as np
import torch

from nnmark.split.datasets import LFW_FACES, load_split_data
from nnmark.split.protocol import SplitConfig, owner_shard, total_rounds


def test_lfw_faces_splits_are_disjoint_balanced_and_deterministic() -> None:
    s = load_split_data(LFW_FACES)
    sizes = [len(s.train), len(s.val), len(s.test), len(s.attacker)]
    assert sizes == [80, 20, 40, 60]
    assert s.image_shape == (1, 25, 25) and s.num_classes == 2
    for part in (s.train, s.val, s.test, s.attacker):
        assert float(part.x.min()) >= 0.0 and float(part.x.max()) <= 1.0
        assert abs(float(part.y.float().mean()) - 0.5) < 1e-6  # stratified: as many faces as non-faces
    # no image appears in two splits (the attacker's public images are not the owners')
    flat = {tuple(np.round(x.flatten().numpy(), 5)) for x in s.train.x}
    for other in (s.val, s.test, s.attacker):
        assert not flat & {tuple(np.round(x.flatten().numpy(), 5)) for x in other.x}
    again = load_split_data(LFW_FACES, seed=0)
    assert torch.equal(again.train.x, s.train.x)
    assert not torch.equal(load_split_data(LFW_FACES, seed=1).train.x, s.train.x)


def test_lfw_faces_is_dealt_to_owners_by_the_protocol() -> None:
    cfg = SplitConfig(data=LFW_FACES, arch="cnn", arch_overrides={"channels": [4, 4, 8, 8], "dense": [16, 16]},
                      at="pool1", owners=4, batch_size=5, epochs=2)
    shards = [owner_shard(cfg, i)[0] for i in range(4)]
    assert [len(d) for d in shards] == [20, 20, 20, 20]
    assert total_rounds(cfg) == 8
    assert len(load_split_data("digits").train) == 1077  # other names still reach the bundled sets
