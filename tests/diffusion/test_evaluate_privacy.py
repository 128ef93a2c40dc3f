"""`dpfast evaluate`'s feature metrics come from a network trained without DP on the private training
set: the report and the printed line mark them private, not covered by epsilon."""
import json

import numpy as np
import torch

from dpfast.diffusion import evaluate as ev
from dpfast.diffusion.data import ImageDataset


def test_feature_metrics_are_marked_private_in_the_report_and_the_line():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8)
    test = ImageDataset(torch.randint(0, 256, (12, 1, 8, 8), generator=g, dtype=torch.uint8),
                        torch.arange(12) % 3, 3, "test")
    torch.manual_seed(0)
    lines = []
    report = ev.evaluate_images(images, None, test, ev.CNN(1, 8, 3).eval(), log=lines.append, progress=False)
    feats = report["features"]
    assert feats["private"] is True and feats["privacy_note"] == ev.PRIVACY_NOTE
    assert "non-DP network trained on the private training set" in feats["privacy_note"]
    assert "not covered by epsilon" in feats["privacy_note"] and "NOT Inception" in feats["note"]
    assert np.isfinite(feats["fid"])
    json.loads(json.dumps(report))                         # the report stays plain JSON
    [line] = [line for line in lines if "FID" in line]
    assert "PRIVATE" in line and "non-DP" in line and "not covered by epsilon" in line
