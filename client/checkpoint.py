"""Tell the rig that a checkpoint is complete: ``checkpoint_complete()``.

A job writes its checkpoint into ``$RIGSHIFT_CHECKPOINT_DIR`` and then calls::

    from client.checkpoint import checkpoint_complete

    save(model, os.path.join(ckpt_dir, "model.pt"))
    save(optimizer, os.path.join(ckpt_dir, "optim.pt"))
    checkpoint_complete()

The marker it writes, and what the agent does with it, are defined once in
:mod:`rigshift.checkpoint` (standard library only: a job whose environment lacks the
``rigshift`` package may copy that file).
"""

from __future__ import annotations

from rigshift.checkpoint import checkpoint_complete

__all__ = ["checkpoint_complete"]
