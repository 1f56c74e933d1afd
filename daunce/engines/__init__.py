"""Engines: what trains the copies and records their signals, all working in one public ``ModelContext``.

* ``context``: ``ModelContext`` (working model, trainable parameters, theta0, the task's calls);
* ``sequential``: one copy after the other; the base cache and the one-copy signal pass;
* ``vmap``: blocks of copies at once with ``torch.func.vmap`` (the same copies up to float rounding);
* ``stacked``: blocks of full-batch copies in shared-input passes (one large matmul for all copies' first layer);
* ``multiadapter``: signals of LoRA copies in peft mixed-adapter passes;
* ``ray_executor``: blocks of copies as Ray tasks, and ``map_tasks`` for any keyed job.
"""

from .context import DEFAULT_MEMORY_BYTES, ModelContext

__all__ = ["ModelContext", "DEFAULT_MEMORY_BYTES"]
