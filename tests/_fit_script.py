"""Helper of tests/test_distributed.py: a Daunce fit in its own process, to be SIGKILLed mid-fit.

Usage: python _fit_script.py WORKDIR OUT.pt EXECUTOR [RAY_ADDRESS]
While the file WORKDIR/../slow exists and some copy is finished, every forward pass sleeps, so the
test can kill the process after the first copies and before the last. The fit runs the vmap trainer:
the shared-input trainer traces the forward once with torch.fx, which would drop the sleep."""

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from daunce import ClassificationTask, Daunce, DaunceConfig
from daunce.experiments import data, models

workdir, out, executor = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
SLOW_FLAG = str(workdir.parent / "slow")
COPIES = str(workdir / "copies")


class SlowAfterFirstCopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = models.seeded(models.mlp, 0, 64, 10, hidden=8)

    def forward(self, x):
        if os.path.exists(SLOW_FLAG) and os.path.isdir(COPIES) and os.listdir(COPIES):
            time.sleep(0.5)
        return self.inner(x)


CONFIG = DaunceConfig(n_models=6, steps=20, rho=0.3, damping=1e-2, isotropic_noise=False)  # explicit: no proxy fits

if __name__ == "__main__":
    torch.set_num_threads(1)
    train, query = data.digits(150, 10, seed=3)
    opts = {}
    if executor == "ray":
        opts = dict(ray_options={"copies_per_task": 1, "init": {"address": sys.argv[4]}})
    d = Daunce(SlowAfterFirstCopy(), ClassificationTask(), CONFIG, workdir, progress=False, trainer="vmap",
               vmap_block=2, executor=executor, **opts)
    d.fit(train, query)
    torch.save({"scores": d.attribute(train, query), "trained": d.trained_copies}, out)
